"""The cluster model: Kubernetes objects kube-proxy reads, synthetic or imported."""
