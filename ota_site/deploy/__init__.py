"""Deployment files and tools: the nginx template (nginx.conf) and its renderer (render.py), the
device CA bundle for nginx (ca_bundle.py), and `make prod-local` (prod_local.py). Nothing here
is imported by the running app."""
