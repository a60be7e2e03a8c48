"""Deployment beyond one machine: the KServe store, the probe, KServe's model server in front of
TorchServe (python modules), the image (Dockerfile) and the manifests (k8s/, kserve/)."""
