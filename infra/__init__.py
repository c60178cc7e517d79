"""Infrastructure: Prometheus and Grafana files, container entry points, and Chameleon provisioning."""
