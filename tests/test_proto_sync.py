"""The committed gRPC stubs must be exactly what grpcio-tools generates from the .proto."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / "protos" / rel
        assert committed.is_file(), f"{rel} is generated but not committed; run: python protos/generate.py"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), \
            f"{rel} is out of sync with the .proto; run: python protos/generate.py"
