"""Deployment files and tools: the nginx template (nginx.conf) and its renderer (render.py), and
`make prod-local` (prod_local.py). The device CA bundle for nginx is written by
`python -m devices.ca_bundle`, in the app that owns the CA. Nothing here
is imported by the running app."""
