"""The built-in importance metrics, each registered through the same hook as a plugin's."""
