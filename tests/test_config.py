from __future__ import annotations

import pytest

from sidecar.config import GuardSet, load_config, parse_config
from sidecar.errors import ConfigError


def test_defaults_follow_the_seeds() -> None:
    g = GuardSet()
    assert (g.running_ppl.threshold, g.logit_variance.threshold, g.max_prob.threshold, g.l2_norm.threshold) == (
        400,
        0.1,
        0.99,
        1e4,
    )
    assert (g.neg_logprob.threshold, g.entropy.threshold, g.rank.threshold, g.margin.threshold) == (9.0, 3.0, 100, 0.01)
    assert g.running_ppl.enabled and g.l2_norm.enabled and g.logit_variance.enabled
    # recalibrated by bench quality: the per-token surprise guard protects by default
    assert g.neg_logprob.enabled and not (g.entropy.enabled or g.rank.enabled or g.margin.enabled or g.max_prob.enabled)


@pytest.mark.parametrize(
    "data, field",
    [
        (
            {"policies": {"default": {"guards": {"running_ppl": {"enabled": True, "threshold": "high"}}}}},
            "policies.default.guards.running_ppl.threshold",
        ),
        (
            {"policies": {"default": {"guards": {"entropy": {"enabled": True, "threshold": float("nan")}}}}},
            "policies.default.guards.entropy.threshold",
        ),
        (
            {"policies": {"default": {"guards": {"entropyy": {"enabled": True, "threshold": 1}}}}},
            "policies.default.guards.entropyy",
        ),
        ({"listen": "localhost"}, "listen"),
        ({"listen": "tcp://host:99999"}, "listen"),
        ({"policies": {"strict": {}}}, "policies 'default'"),
        ({"max_sessions": 0}, "max_sessions"),
    ],
)
def test_bad_config_names_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "test.yaml")
    assert field.split(" ")[0] in str(err.value) and "test.yaml" in str(err.value)


def test_config_file_errors_name_the_file(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_validated_too(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("listen: unix:///tmp/a.sock\n")
    assert load_config(p, {"listen": "tcp://127.0.0.1:5000"}).grpc_address() == "127.0.0.1:5000"
    with pytest.raises(ConfigError, match="listen"):
        load_config(p, {"listen": "nonsense"})
