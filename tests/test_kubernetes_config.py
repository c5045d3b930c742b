"""configs/kubernetes/pytorchjob.yaml cannot rot silently. No Kubernetes runs here, so what can
be checked without one is: the file parses; the PyTorchJob uses only the Training Operator's
field names (kubeflow.org/v1 ``PyTorchJobSpec`` and ``ElasticPolicy``) and the rules its webhook
enforces (one Master, a Worker when elastic); its pods mount the PVC it ships where ``--out``
points; the grace period outlasts torchrun's SIGTERM-to-SIGKILL wait; and its command line is
one torchrun parses and ``trainctl run`` accepts: flags from ``trainctl run --help`` only, and a
``--dry-run`` of it (config file, every ``--set``) passes."""

from __future__ import annotations

import re

import yaml
from torch.distributed.run import get_args_parser

from tests.conftest import ROOT, run_cli

JOB_FILE = ROOT / "configs" / "kubernetes" / "pytorchjob.yaml"
SPEC_FIELDS = {"runPolicy", "elasticPolicy", "pytorchReplicaSpecs", "nprocPerNode"}
ELASTIC_FIELDS = {"minReplicas", "maxReplicas", "rdzvBackend", "rdzvPort", "rdzvHost", "rdzvId", "rdzvConf",
                  "standalone", "nProcPerNode", "maxRestarts", "metrics"}
# torch.distributed.elastic.rendezvous.dynamic_rendezvous.create_handler's settings (all integers)
RDZV_CONF_KEYS = {"join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout",
                  "keep_alive_interval", "keep_alive_max_attempt"}


class UniqueKeys(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping without a word; kubectl refuses them."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def documents() -> tuple[dict, dict]:
    pvc, job = yaml.load_all(JOB_FILE.read_text(), Loader=UniqueKeys)
    assert (pvc["kind"], job["kind"], job["apiVersion"]) == ("PersistentVolumeClaim", "PyTorchJob", "kubeflow.org/v1")
    return pvc, job


def container(job: dict, replica: str = "Master") -> dict:
    containers = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"]
    (trainer,) = [c for c in containers if c["name"] == "pytorch"]  # where the operator puts PET_*
    return trainer


def test_the_job_uses_the_operators_fields_and_the_pvc_it_ships():
    pvc, job = documents()
    spec = job["spec"]
    assert set(spec) <= SPEC_FIELDS, set(spec) - SPEC_FIELDS
    elastic = spec["elasticPolicy"]
    assert set(elastic) <= ELASTIC_FIELDS, set(elastic) - ELASTIC_FIELDS
    assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] >= 1
    for item in elastic["rdzvConf"]:
        assert set(item) == {"key", "value"} and item["key"] in RDZV_CONF_KEYS and item["value"].isdigit(), item
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1  # the webhook's rules
    assert elastic["minReplicas"] <= 1 + replicas["Worker"]["replicas"] <= elastic["maxReplicas"]
    assert elastic["rdzvHost"] == f"{job['metadata']['name']}-master-0"  # the Master's service hosts the store
    assert all(r["restartPolicy"] == "OnFailure" for r in replicas.values())
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]  # one pod, written twice
    pod = replicas["Master"]["template"]["spec"]
    trainer = container(job)
    ports = {p["name"]: p["containerPort"] for p in trainer["ports"]}
    assert ports["pytorchjob-port"] == elastic["rdzvPort"]
    # --out on the shared volume, the claim this file creates, writable by every pod
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    args = trainer["args"]
    out = args[args.index("--out") + 1]
    mounts = [m for m in trainer["volumeMounts"] if out.startswith(m["mountPath"].rstrip("/") + "/")]
    assert [claims.get(m["name"]) for m in mounts] == [pvc["metadata"]["name"]], (out, mounts, claims)
    # SIGTERM reaches torchrun (PID 1, no shell), which gives the ranks --shutdown-timeout to save
    assert trainer["command"] == ["torchrun"]
    # torch 2.13's shared TCPStore hangs a pod that rejoins a running group (README)
    assert {e["name"]: e["value"] for e in trainer["env"]}["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    shutdown = get_args_parser().parse_args(args).shutdown_timeout
    assert shutdown and pod["terminationGracePeriodSeconds"] > shutdown


def test_the_command_line_is_one_torchrun_and_trainctl_run_accept(tmp_path):
    _, job = documents()
    parsed = get_args_parser().parse_args(container(job)["args"])  # an unknown torchrun flag exits here
    assert parsed.module and parsed.training_script == "trainctl" and parsed.training_script_args[0] == "run"
    argv = parsed.training_script_args[1:]
    help_text = run_cli("run", "--help", check=True).stdout
    accepted = set(re.findall(r"^  (?:(-\w), )?(--[a-z][a-z-]*)", help_text, flags=re.M))
    flags = {f for pair in accepted for f in pair if f}
    assert {"--out", "--set", "--yes", "--dry-run"} <= flags, help_text  # the help's layout is still read right
    used = [a for a in argv if a.startswith("-")]
    assert set(used) <= flags, set(used) - flags
    # the same command, run from the image's working directory (this repository) as a dry run
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    dry = run_cli("run", *argv, "--dry-run", timeout=120)
    assert dry.returncode == 0 and "dry run: config, data and model are valid" in dry.stdout, dry.stdout + dry.stderr
