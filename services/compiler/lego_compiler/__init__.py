"""The compiler: validates workflow specs and registers templates in the cluster store."""
