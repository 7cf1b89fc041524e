"""Running the whole system on one machine, for development: `make run`."""
