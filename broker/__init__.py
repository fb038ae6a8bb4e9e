"""The Tether broker: actors, network edge, users file, logging and the command line."""
