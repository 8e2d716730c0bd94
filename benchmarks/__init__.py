"""Rendezvous scaling benchmarks: ours (etcd_rdzv, c10d_rdzv) against torch's etcd-v2 and c10d.

Run ``python -m benchmarks.run --help``.
"""
