"""Lightning training for the age and gender network: `python -m training <command>`."""
