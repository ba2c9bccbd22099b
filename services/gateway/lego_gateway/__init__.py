"""The gateway: the front door (gRPC and REST); keeps each accepted request until it is answered."""
