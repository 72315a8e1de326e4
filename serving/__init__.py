"""HTTP-side pieces of the BentoML service: settings, response schemas, the request guard."""
