"""Settings shared by the launcher and the three processes; imports no process package."""
