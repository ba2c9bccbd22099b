"""The `lego` command: top of the stack; it may import every service, nothing imports it."""
