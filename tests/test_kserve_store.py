"""The KServe store's TorchServe configurations (deploy/kserve_store.py), without a server:
every value comes from the archives' settings, the contract and the repository's config."""
from __future__ import annotations

import json

import pytest

from deploy.kserve_store import ARCHIVE_VERSION, CONFIG_FILES, port_of, write_configs
from export.archive import TASKS
from handlers.contract import KSERVE_MODEL_ROOT, KSERVE_PREDICTOR_PORT, MAX_REQUEST_BYTES, SERVICE_ENVELOPES
from serving.torchserve import CONFIG, read_properties


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    write_configs(store)
    return {name: read_properties(store / "config" / name) for name in CONFIG_FILES}


def test_every_configuration_is_written_with_the_files_it_names(configs, tmp_path):
    written = write_configs(tmp_path)
    assert sorted(p.name for p in written) == sorted(CONFIG_FILES)
    assert {"config.properties", "rest.properties"} <= set(CONFIG_FILES)  # KServe's default, deploy/k8s/
    for props in configs.values():
        assert props["metrics_config"].startswith(f"{KSERVE_MODEL_ROOT}/config/")
        assert (tmp_path / "config" / props["metrics_config"].rsplit("/", 1)[1]).is_file()
        assert f"file://{KSERVE_MODEL_ROOT}/config/log4j2.xml" in props["vmargs"]
        assert (tmp_path / "config" / "log4j2.xml").read_text() == (CONFIG.parent / "log4j2.xml").read_text()


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_snapshot_envelope_and_listeners_follow_the_sources(configs, name):
    cfg, props = CONFIG_FILES[name], configs[name]
    repo = read_properties(CONFIG)
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == len(cfg.tasks) == len(snapshot["models"])
    for task in cfg.tasks:
        archive = TASKS[task].archive_name(task)
        entry = snapshot["models"][archive][ARCHIVE_VERSION]
        exported = TASKS[task].model_config
        assert entry["marName"] == f"{archive}.mar" and entry["defaultVersion"] is True
        workers = cfg.gpus or exported["minWorkers"]
        assert entry["minWorkers"] == entry["maxWorkers"] == workers
        # KServe's envelopes answer only the first request of a TorchServe batch
        assert entry["batchSize"] == (1 if cfg.protocol else exported["batchSize"])
        assert entry["responseTimeout"] == exported["responseTimeout"]
    assert props.get("service_envelope") == (SERVICE_ENVELOPES[cfg.protocol] if cfg.protocol else None)
    assert props.get("number_of_gpu") == (str(cfg.gpus) if cfg.gpus else None)
    # TorchServe on the pod's loopback (its one client is in the pod), metrics for Prometheus
    loopback = f"http://127.0.0.1:{KSERVE_PREDICTOR_PORT}"
    assert props["inference_address"] == props["management_address"] == loopback
    assert props["metrics_address"] == f"http://0.0.0.0:{port_of(repo['metrics_address'])}"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "true"
    assert props["model_store"] == f"{KSERVE_MODEL_ROOT}/model-store"
    # limits and the safe settings carried over unchanged
    assert int(props["max_request_size"]) == MAX_REQUEST_BYTES
    for key in ("max_response_size", "job_queue_size", "default_response_timeout", "enable_model_api",
                "install_py_dep_per_model", "metrics_mode", "disable_system_metrics"):
        assert props[key] == repo[key], key
