"""Built-in blockprune adapters, registered through the same plugin hooks as third-party ones."""
