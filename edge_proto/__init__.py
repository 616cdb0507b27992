"""Wire contracts (gRPC stubs) shared by the services.

The stubs are generated from ``proto/`` by :mod:`edge_proto.generate` and are not kept in
git: ``edge_proto.csi.v1.csi_pb2(_grpc)``, ``edge_proto.kms.v2.service_pb2(_grpc)``,
``edge_proto.kms.v2.encrypted_object_pb2`` and ``edge_proto.kms.v1beta1.service_pb2(_grpc)``.
Run ``python -m edge_proto.generate`` after changing a ``.proto`` file.
"""
