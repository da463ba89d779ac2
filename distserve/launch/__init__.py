"""Starting a cluster: the cluster YAML, rank → instance assignment, the torchrun entry, `serve`."""
