"""OTA: the firmware store, image signing, and serving images and manifests over HTTP."""
