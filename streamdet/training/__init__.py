"""Training, clip evaluation and their CLI commands (see ``commands.add_commands``)."""
