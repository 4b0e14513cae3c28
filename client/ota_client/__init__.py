"""ota-client: the device side of the OTA update server (docs/client.md)."""

__version__ = "0.1.0"
