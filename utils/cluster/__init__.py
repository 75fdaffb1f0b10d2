"""backend: ray. The same server over Ray Serve replicas (one per GPU by default), each running our
model manager and engines; requests are routed by model key with `serve.multiplexed`.

  replica.py  ModelReplica: the Serve deployment (one manager + engines per replica, no Flask)
  router.py   TargetedRouter: Serve's default routing, plus "this replica" for admin and status calls
  front.py    Cluster (start/connect, handles, error mapping), ClusterManager and RayInference: what
              the Flask front keeps in Services.manager / .inference in place of the local ones

What crosses to a replica: the decoded request (PIL images, numpy arrays, video frames) and the
validated job, pickled; never a path. Temp files and uploads stay on the front.
"""
