"""The etcd runtime: a client with failover and one retry policy, leases, watches, transactions as
data, the watch-fed cache that owns read-your-writes, and the process registry. It knows etcd,
not rendezvous: the modules beside this package adapt it to the rendezvous backend contract."""
