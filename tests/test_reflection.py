"""gRPC server reflection: on by default, so generic tools can list and call the API."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from sidecar._pb.fse.v1 import guard_pb2 as pb


def test_reflection_lists_the_services_and_describes_every_method(start_sidecar) -> None:
    sc = start_sidecar()
    with grpc.insecure_channel(sc.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"fse.v1.GuardService", "grpc.health.v1.Health"} <= services
        service = DescriptorPool(db).FindServiceByName("fse.v1.GuardService")
        described = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    declared = {
        m.name: (m.input_type.full_name, m.output_type.full_name) for m in pb.DESCRIPTOR.services_by_name["GuardService"].methods
    }
    assert described == declared and described["Steps"] == ("fse.v1.StepsRequest", "fse.v1.StepsResponse")


def test_reflection_can_be_turned_off(start_sidecar) -> None:
    sc = start_sidecar(reflection=False)
    with grpc.insecure_channel(sc.target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ProtoReflectionDescriptorDatabase(ch).get_services()
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
