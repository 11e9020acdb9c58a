"""loraserve: command line, launcher, client and the built-in demo."""
