"""`python -m predict`: age and gender for every face in a folder of photos, locally or through a service."""
