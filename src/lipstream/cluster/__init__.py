"""lipstream on a Ray cluster (`lipstream cluster`; the optional `cluster` extra): lipstream servers as
Ray Serve replicas behind one port, new sessions placed by free capacity, every later request of a
session routed to its replica by the id in its URL, autoscaling on sessions, draining on scale-down.

Modules: affinity (routing keys from URLs), proxy (the middleware in Serve's HTTP proxies), router
(Serve's request router), replica (the deployment), autoscale (the policy), directory (the replicas'
states), metrics (one exposition of all), launch (starting it all), cli (the command). `cli`,
`affinity`, `proxy` and `metrics` import without Ray; the others need the `cluster` extra."""
