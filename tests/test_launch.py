"""The Cloud TPU launch scripts (launch/), checked without a cloud account.

Every script runs with --dry-run in a sandbox copy of the repository (git checkout with
placeholder configs); the printed gcloud / git commands are parsed back with shlex and
checked: --worker=all, the config, the workdir a resumed run restarts from, the spot flag.
Fake `gcloud` and `gsutil` executables sit first on PATH and record any call, so a dry run
that runs a cloud command fails the test. The worker-side scripts (launch/remote/) run for real
on this machine against a fake virtualenv whose `python` is a shell script.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from launch_sandbox import (
    LAUNCH,
    REPO,
    SCRIPTS,
    WORKDIR,
    Result,
    flag,
    git,
    make_sandbox,
    run_script,
)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    return make_sandbox(tmp_path_factory.mktemp("launch"))


@pytest.fixture
def launch(sandbox, guard_bin):
    def _run(script: str, *args: str, **env: str) -> Result:
        return run_script(sandbox, guard_bin, script, *args, **env)

    return _run


def remote(cmd: list[str]) -> list[str]:
    """The words of an ssh command's --command string, as the worker's shell splits them."""
    return shlex.split(flag(cmd, "command"))


# ---- static checks --------------------------------------------------------------------------
def test_every_script_parses_with_bash_n():
    for path in [*LAUNCH.glob("*.sh"), *(LAUNCH / "remote").glob("*.sh")]:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


@pytest.mark.skipif(
    shutil.which("shellcheck") is None and not os.environ.get("CI"),
    reason="shellcheck is not installed here (.ci/run installs it; under CI this test runs)",
)
def test_every_script_is_shellcheck_clean():
    assert shutil.which("shellcheck"), "shellcheck is not installed; .ci/run installs it"
    paths = [str(p) for p in [*LAUNCH.glob("*.sh"), *(LAUNCH / "remote").glob("*.sh")]]
    proc = subprocess.run(["shellcheck", "-x", *paths], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_script(sandbox, guard_bin, script):
    result = run_script(sandbox, guard_bin, script, "--help", dry=False)
    assert result.returncode == 0
    assert "--dry-run" in result.stdout and f"launch/{script}" in result.stdout


def test_no_script_or_runbook_uses_the_legacy_gsutil():
    # gsutil leaves the gcloud CLI; every copy goes through `gcloud storage`.
    paths = [*LAUNCH.rglob("*.sh"), REPO / "README.md", *(REPO / "docs").glob("*.md")]
    assert [p for p in paths if "gsutil" in p.read_text()] == []


def test_printed_commands_read_back_to_the_same_arguments(sandbox):
    tricky = ["plain", "two words", "it's", "--command=cd x && ls --jax='jax[tpu]'", ""]
    tricky += ["$HOME", 'say "hi"!', "a'b\"c$d"]
    script = ["bash", "-c", 'source "$0"; join_quoted "$@"', str(sandbox / "launch/common.sh")]
    assert shlex.split(subprocess.check_output([*script, *tricky], text=True)) == tricky


# ---- settings and errors --------------------------------------------------------------------
NEEDS_PROJECT = [(s, ()) for s in SCRIPTS if s != "prepare_data.sh"] + [
    ("prepare_data.sh", ("cache",))
]


@pytest.mark.parametrize("script,args", NEEDS_PROJECT)
def test_missing_project_stops_before_any_command(launch, script, args):
    needed = {"REFERENCE_STATS": "gs://my-bkt/ref.npz", "VAE_CKPT": "gs://my-bkt/src/kl16.ckpt"}
    result = launch(script, *args, PROJECT=None, **needed)
    assert result.returncode == 2
    assert "PROJECT is not set" in result.stderr
    assert result.commands == []


@pytest.mark.parametrize("script", ["install.sh", "start.sh", "resume.sh", "eval.sh"])
def test_missing_bucket_stops_before_any_command(launch, script):
    result = launch(script, BUCKET=None, REFERENCE_STATS="gs://x/ref.npz")
    assert result.returncode == 2
    assert "BUCKET is not set" in result.stderr
    assert result.commands == []


@pytest.mark.parametrize(
    "env,message",
    [
        ({"ACCELERATOR_TYPE": "v9-8"}, "one of v4, v5p, v5litepod, v6e"),
        ({"SPOT": "yes"}, "SPOT='yes' is not allowed; use 0 or 1"),
        ({"SPOT": "1", "RESERVED": "1"}, "at most one of SPOT, PREEMPTIBLE, RESERVED"),
        ({"PREEMPTIBLE": "1"}, "PREEMPTIBLE=1 needs QUEUED_RESOURCE=0"),
        ({"TPU_NAME": "My_TPU"}, "TPU_NAME='My_TPU' is not a valid name"),
        ({"WORKDIR": "/tmp/run"}, "WORKDIR='/tmp/run' must be a gs://"),
        ({"CONFIG": "configs/xar_x.py"}, "configs/xar_h.py"),
        (
            {"MODE": "serve"},
            "MODE='serve' is not allowed; use one of: train sample eval",
        ),
        ({"DATA_SOURCE": "lmdb"}, "DATA_SOURCE='lmdb' is not allowed"),
        ({"DATA_SOURCE": "imagenet"}, "DATA_SOURCE=imagenet: the trainer reads ImageNet only"),
        ({"CONFIG_OVERRIDES": "--lr=1"}, "each entry must look like --config.field=value"),
        ({"MAIN_FLAGS": "--workdir=/tmp"}, "MAIN_FLAGS holds '--workdir=/tmp'"),
        ({"BUCKET": "gs://my-bkt"}, "give the bare name"),
        ({"NUM_SLICES": "0"}, "NUM_SLICES='0' is not allowed; use a whole number of slices"),
        ({"NUM_SLICES": "2", "QUEUED_RESOURCE": "0"}, "NUM_SLICES=2 needs QUEUED_RESOURCE=1"),
        ({"CONFIG_OVERRIDES": "--config.mesh.num_slices=2"}, "set NUM_SLICES instead"),
        ({"INTERNAL_IP": "yes"}, "INTERNAL_IP='yes' is not allowed; use 0 or 1"),
    ],
)
def test_bad_settings_are_rejected_with_the_variable_and_allowed_values(launch, env, message):
    result = launch("start.sh", **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.commands == []


def test_unexpected_arguments_are_rejected(launch):
    assert "--config.field=value" in launch("start.sh", "--lr=3").stderr
    assert launch("create.sh", "extra").returncode == 2
    assert "exactly one action" in launch("prepare_data.sh").stderr


# ---- create / install / start / stop / logs / delete ----------------------------------------
def test_create_requests_a_spot_queued_resource_and_waits(launch):
    result = launch("create.sh", SPOT="1")
    assert result.returncode == 0, result.stderr
    create = result.one("queued-resources", "create")
    assert create[create.index("create") + 1] == "xar-v5p-64-qr"
    assert "--spot" in create
    assert flag(create, "node-id") == "xar-v5p-64"
    assert flag(create, "accelerator-type") == "v5p-64"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert flag(create, "zone") == "us-east5-a"
    assert flag(create, "project") == "my-proj"
    assert result.find("queued-resources", "describe") and result.find("tpu-vm", "describe")


@pytest.mark.parametrize(
    "accelerator,runtime,zone",
    [
        ("v4-128", "tpu-ubuntu2204-base", "us-central2-b"),
        ("v5p-256", "v2-alpha-tpuv5", "us-east5-a"),
        ("v6e-32", "v2-alpha-tpuv6e", "us-east5-b"),
    ],
)
def test_create_tpu_vm_uses_the_runtime_and_zone_of_its_family(launch, accelerator, runtime, zone):
    result = launch("create.sh", QUEUED_RESOURCE="0", ACCELERATOR_TYPE=accelerator, WAIT="0")
    create = result.one("tpu-vm", "create")
    assert flag(create, "version") == runtime and flag(create, "zone") == zone
    assert flag(create, "accelerator-type") == accelerator
    assert not {"--spot", "--preemptible", "--reserved"} & set(create)
    assert not result.find("describe")  # WAIT=0


def test_create_passes_capacity_and_extra_flags(launch):
    extra = "--network=train-net --internal-ips"
    result = launch("create.sh", QUEUED_RESOURCE="0", PREEMPTIBLE="1", CREATE_FLAGS=extra)
    create = result.one("tpu-vm", "create")
    assert "--preemptible" in create and "--internal-ips" in create
    assert flag(create, "network") == "train-net"


def test_install_ships_the_committed_tree_to_every_worker(sandbox, launch):
    result = launch("install.sh")
    assert result.returncode == 0, result.stderr
    head = git(sandbox, "rev-parse", "HEAD")
    archive = result.one("git", "archive")
    assert archive[-1] == head
    tarball = archive[archive.index("-o") + 1]
    scp = result.one("scp")
    assert tarball in scp and "xar-v5p-64:xar-jax.tar.gz" in scp
    assert flag(scp, "worker") == "all"
    ssh = result.one("ssh")
    assert flag(ssh, "worker") == "all"
    words = remote(ssh)
    installer = words[words.index("xar-jax.new/launch/remote/install_worker.sh") + 1 :]
    expected = f"--commit={head[:12]} --python=3.12 --jax=jax[tpu] --weights=gs://my-bkt/weights"
    assert installer == expected.split()


def test_install_refuses_uncommitted_changes_unless_allowed(tmp_path, guard_bin):
    repo = make_sandbox(tmp_path)
    (repo / "configs" / "xar_h.py").write_text("# edited, not committed\n")
    refused = run_script(repo, guard_bin, "install.sh")
    assert refused.returncode == 2 and "uncommitted changes" in refused.stderr
    allowed = run_script(repo, guard_bin, "install.sh", ALLOW_DIRTY="1")
    assert allowed.returncode == 0, allowed.stderr
    shipped = allowed.one("git", "archive")[-1]
    assert shipped != git(repo, "rev-parse", "HEAD")  # a commit of the working tree
    assert git(repo, "show", f"{shipped}:configs/xar_h.py") == "# edited, not committed"


def test_start_runs_main_on_every_worker_with_the_config_and_workdir(launch):
    result = launch("start.sh", SPOT="1")
    assert result.returncode == 0, result.stderr
    scp = result.one("scp")
    assert flag(scp, "worker") == "all" and "xar-v5p-64:xar-jax/configs/xar_h.py" in scp
    copy = result.one("storage", "cp")
    assert copy[-1].startswith(f"{WORKDIR}/launch/") and copy[-1].endswith("-xar_h.py")
    start = [c for c in result.find("ssh") if "start" in remote(c)]
    assert len(start) == 1 and flag(start[0], "worker") == "all"
    expected = (
        f"bash xar-jax/launch/remote/worker.sh start train {WORKDIR}/logs"
        f" --config=configs/xar_h.py --workdir={WORKDIR} --mode=train --distributed=on"
        " --config.mesh.num_slices=1"
        " --config.data.source=latents --config.data.cache_dir=gs://my-bkt/latents"
    )
    assert remote(start[0]) == expected.split()


def test_start_appends_overrides_from_environment_then_command_line(launch):
    env = {"LATENT_DIR": "gs://my-bkt/lat", "MODE": "sample", "CONFIG": "configs/xar_b.py"}
    env["CONFIG_OVERRIDES"] = "--config.train.global_batch_size=1024 --config.seed=1"
    env["MAIN_FLAGS"] = "--distributed=auto"
    result = launch("start.sh", "--config.optim.lr=1e-4", "--config.seed=3", **env)
    words = _start_command(result)
    assert words[7:9] == ["--mode=sample", "--distributed=auto"] and words[3] == "sample"
    assert [w for w in words if w.startswith("--distributed")] == ["--distributed=auto"]
    assert "--config=configs/xar_b.py" in words and "--workdir=gs://my-bkt/runs/xar_b" in words
    expected = (
        "--config.data.source=latents --config.data.cache_dir=gs://my-bkt/lat"
        " --config.train.global_batch_size=1024 --config.seed=1 --config.optim.lr=1e-4"
        " --config.seed=3"
    )
    assert words[-6:] == expected.split()


def test_a_config_outside_the_repository_is_copied_under_configs_launched(launch, tmp_path):
    own = tmp_path / "my_cfg.py"
    own.write_text("# mine\n")
    result = launch("start.sh", CONFIG=f"{own}:h")
    assert result.returncode == 0, result.stderr
    assert "xar-v5p-64:xar-jax/configs/launched/my_cfg.py" in result.one("scp")
    words = remote(result.find("ssh")[-1])
    assert "--config=configs/launched/my_cfg.py:h" in words
    assert "--workdir=gs://my-bkt/runs/my_cfg_h" in words


def test_stop_signals_the_job_on_every_worker(launch):
    ssh = launch("stop.sh", STOP_TIMEOUT="300").one("ssh")
    assert flag(ssh, "worker") == "all"
    assert remote(ssh) == ["bash", "xar-jax/launch/remote/worker.sh", "stop", "train", "300"]


def test_logs_follow_worker_0_and_upload_from_every_worker(launch):
    tail = launch("logs.sh").one("ssh")
    assert flag(tail, "worker") == "0" and remote(tail)[2:] == ["log", "train", "100", "1"]
    several = launch("logs.sh", WORKER="all", MODE="eval").one("ssh")
    assert flag(several, "worker") == "all" and remote(several)[2:] == ["log", "eval", "100", "0"]
    assert "WORKER='0-3' is not allowed" in launch("logs.sh", WORKER="0-3").stderr  # not gcloud's
    second = launch("logs.sh", NUM_SLICES="2", SLICE="1", WORKER="3").one("ssh")
    assert second[3] == "queued-resources" and flag(second, "node") == "1"
    assert flag(second, "worker") == "3" and remote(second)[2:] == ["log", "train", "100", "1"]
    assert "SLICE=2 is not allowed" in launch("logs.sh", NUM_SLICES="2", SLICE="2").stderr
    upload = launch("logs.sh", "--upload").one("ssh")
    assert flag(upload, "worker") == "all"
    assert remote(upload)[2:] == ["upload-log", "train", f"{WORKDIR}/logs"]
    assert "WORKER='w1'" in launch("logs.sh", WORKER="w1").stderr


def test_delete_asks_for_confirmation_unless_yes(launch):
    asked = launch("delete.sh").one("queued-resources", "delete")
    assert "--force" in asked and "--quiet" not in asked
    assert "--quiet" in launch("delete.sh", YES="1").one("queued-resources", "delete")
    vm = launch("delete.sh", QUEUED_RESOURCE="0").one("tpu-vm", "delete")
    assert vm[vm.index("delete") + 1] == "xar-v5p-64"


# ---- several slices -------------------------------------------------------------------------
SLICES = {"NUM_SLICES": "2", "SPOT": "1", "ALLOW_DIRTY": "1"}
TPU_COMMANDS = ("ssh", "scp")


def _reaches_every_worker_of_every_slice(result: Result) -> list[list[str]]:
    """The ssh/scp commands of a two-slice dry run; each must go to every node and worker."""
    assert result.returncode == 0, result.stderr
    remote_calls = [
        c
        for c in result.commands
        if c[:3] == ["gcloud", "compute", "tpus"] and c[4] in TPU_COMMANDS
    ]
    assert remote_calls, result.stdout
    for cmd in remote_calls:
        assert cmd[3] == "queued-resources", cmd  # tpu-vm ssh would reach one node only
        assert flag(cmd, "node") == "all" and flag(cmd, "worker") == "all", cmd
    return remote_calls


def test_two_slices_are_one_queued_resource_of_two_nodes(launch):
    result = launch("create.sh", **SLICES)
    assert result.returncode == 0, result.stderr
    create = result.one("queued-resources", "create")
    assert flag(create, "node-count") == "2" and flag(create, "node-prefix") == "xar-v5p-64"
    assert not [a for a in create if a.startswith("--node-id")] and "--spot" in create
    described = [c[c.index("describe") + 1] for c in result.find("tpu-vm", "describe")]
    assert described == ["xar-v5p-64-0", "xar-v5p-64-1"]  # the queued resource's node names
    single = launch("create.sh", SPOT="1").one("queued-resources", "create")
    assert flag(single, "node-id") == "xar-v5p-64" and "--node-count=2" not in single


@pytest.mark.parametrize(
    "script, env",
    [
        ("start.sh", {}),
        ("stop.sh", {}),
        ("install.sh", {}),
        ("resume.sh", {"DRY_RUN_JOB": "failed:1,running"}),
        ("resume.sh", {"DRY_RUN_QR_STATE": "SUSPENDED"}),
        (
            "eval.sh",
            {
                "REFERENCE_STATS": "gs://my-bkt/ref.npz",
                "SAMPLES_DIR": "gs://my-bkt/s",
                "VAE_DIR": "/v",
                "INCEPTION_DIR": "/i",
            },
        ),
    ],
)
def test_two_slice_jobs_reach_every_worker_of_both_slices(launch, script, env):
    calls = _reaches_every_worker_of_every_slice(launch(script, **SLICES, **env))
    for cmd in calls:
        assert cmd[5] == "xar-v5p-64-qr" or cmd[-5].startswith("xar-v5p-64-qr:"), cmd
    starts = [remote(c) for c in calls if c[4] == "ssh" and remote(c)[2:3] == ["start"]]
    if script != "stop.sh" and script != "install.sh":
        assert len(starts) == 1
        # JAX finds the coordinator and the slice ids itself (the queued resource's metadata);
        # the mesh's dcn axis must match the slices created.
        assert "--distributed=on" in starts[0] and "--config.mesh.num_slices=2" in starts[0]


def test_a_preempted_node_of_either_slice_recreates_the_queued_resource(launch):
    result = launch("resume.sh", **SLICES, DRY_RUN_TPU_STATE="PREEMPTED")
    assert result.returncode == 0, result.stderr
    assert "TPU xar-v5p-64-0 is PREEMPTED" in result.stderr
    assert result.one("queued-resources", "delete") and result.one("queued-resources", "create")


def test_internal_ip_reaches_the_workers_by_their_internal_address(launch):
    for env in ({}, SLICES):
        result = launch("start.sh", INTERNAL_IP="1", **env)
        calls = [c for c in result.commands if c[:3] == ["gcloud", "compute", "tpus"]]
        assert calls and all("--internal-ip" in c for c in calls)
    assert not [c for c in launch("start.sh").commands if "--internal-ip" in c]


# ---- resume ---------------------------------------------------------------------------------
def _start_command(result: Result) -> list[str]:
    starts = [remote(c) for c in result.find("ssh") if remote(c)[2:3] == ["start"]]
    assert len(starts) == 1, result.stdout
    return starts[0]


@pytest.mark.parametrize(
    "script, args, env",
    [
        ("start.sh", (), {"ACCELERATOR_TYPE": "v6e-8"}),  # single host: harmless, sees preemption
        ("resume.sh", (), {"DRY_RUN_JOB": "failed:1,running"}),
        (
            "eval.sh",
            (),
            {
                "REFERENCE_STATS": "gs://b/ref.npz",
                "SAMPLES_DIR": "/s",
                "VAE_DIR": "/v",
                "INCEPTION_DIR": "/i",
            },
        ),
    ],
)
def test_every_job_initialises_jax_distributed_on_the_tpu_vms(launch, script, args, env):
    # GCE TPU VMs export no variable that --distributed=auto could see; the scripts force it on.
    words = _start_command(launch(script, *args, **env))
    assert [w for w in words if w.startswith("--distributed")] == ["--distributed=on"]
    assert words[words.index("--distributed=on") - 1].startswith("--mode=")


def test_resume_after_spot_preemption_recreates_the_slice_and_restarts_from_the_workdir(launch):
    fresh = _start_command(launch("start.sh", SPOT="1"))
    result = launch("resume.sh", SPOT="1", ALLOW_DIRTY="1", DRY_RUN_QR_STATE="SUSPENDED")
    assert result.returncode == 0, result.stderr
    kinds = [(c[3], c[4]) for c in result.commands if c[:3] == ["gcloud", "compute", "tpus"]]
    assert kinds.index(("queued-resources", "delete")) < kinds.index(("queued-resources", "create"))
    assert "--quiet" in result.one("queued-resources", "delete")
    assert "--spot" in result.one("queued-resources", "create")
    assert result.find("git", "archive") and result.find("scp")
    resumed = _start_command(result)
    assert resumed == fresh  # same config, same WORKDIR: the trainer restores its checkpoint
    assert f"--workdir={WORKDIR}" in resumed and "--config=configs/xar_h.py" in resumed


def test_resume_of_a_preempted_tpu_vm_deletes_and_recreates_it(launch):
    result = launch(
        "resume.sh", QUEUED_RESOURCE="0", SPOT="1", ALLOW_DIRTY="1", DRY_RUN_TPU_STATE="PREEMPTED"
    )
    assert result.returncode == 0, result.stderr
    assert "--quiet" in result.one("tpu-vm", "delete")
    assert "--spot" in result.one("tpu-vm", "create")
    assert f"--workdir={WORKDIR}" in _start_command(result)


def test_resume_leaves_a_running_job_alone(launch):
    result = launch("resume.sh", DRY_RUN_JOB="running,running")
    assert result.returncode == 0, result.stderr
    assert not result.find("create") and not result.find("delete") and not result.find("scp")
    assert [remote(c)[2] for c in result.find("ssh")] == ["status"]
    assert "runs on every worker" in result.stderr


def test_resume_does_not_restart_a_finished_job(launch):
    result = launch("resume.sh", DRY_RUN_JOB="finished,finished")
    assert [remote(c)[2] for c in result.find("ssh")] == ["status"]
    assert "finished" in result.stderr


@pytest.mark.parametrize("job", ["absent", "running,absent", "failed:1", "finished,failed:137"])
def test_resume_restarts_a_job_missing_on_any_worker_of_a_healthy_slice(launch, job):
    result = launch("resume.sh", DRY_RUN_JOB=job)
    assert result.returncode == 0, result.stderr
    actions = [remote(c)[2] for c in result.find("ssh") if "worker.sh" in flag(c, "command")]
    assert actions == ["status", "stop", "start"]
    assert not result.find("create") and not result.find("git", "archive")


def test_resume_waits_for_a_queued_slice_then_installs_and_starts(launch):
    result = launch("resume.sh", ALLOW_DIRTY="1", DRY_RUN_QR_STATE="WAITING_FOR_RESOURCES")
    assert not result.find("create") and not result.find("delete")
    assert result.find("git", "archive") and _start_command(result)


def test_resume_refuses_states_it_does_not_know(launch):
    result = launch("resume.sh", DRY_RUN_TPU_STATE="HIBERNATING")
    assert result.returncode == 2 and "HIBERNATING" in result.stderr


# ---- data, weights, evaluation --------------------------------------------------------------
def test_prepare_data_build_runs_tfds_on_a_cpu_vm_detached(launch):
    result = launch("prepare_data.sh", "build")
    assert result.returncode == 0, result.stderr
    vm = result.one("instances", "create")
    assert vm[vm.index("create") + 1] == "xar-prep" and flag(vm, "scopes") == "cloud-platform"
    assert flag(vm, "zone") == "us-east5-a"
    assert result.one("compute", "scp")[-3] == "xar-prep:build_imagenet.sh"
    tmux = remote(result.one("compute", "ssh"))
    assert tmux[:5] == ["tmux", "new-session", "-d", "-s", "xar-build-imagenet"]
    expected = (
        "bash build_imagenet.sh --tars=gs://my-bkt/imagenet_manual --data-dir=gs://my-bkt/tfds"
    )
    assert shlex.split(tmux[5])[:4] == expected.split()
    assert "--quiet" in launch("prepare_data.sh", "cleanup", YES="1").one("instances", "delete")
    assert launch("prepare_data.sh", "status").find("gcloud", "storage", "ls")


def test_prepare_data_cache_encodes_imagenet_into_the_latent_dir_on_every_worker(launch):
    assert "VAE_DIR is not set" in launch("prepare_data.sh", "cache").stderr
    result = launch("prepare_data.sh", "cache", LATENT_DIR="gs://my-bkt/lat256", VAE_DIR="/w/kl16")
    assert flag(result.one("ssh"), "worker") == "all"
    words = _start_command(result)
    assert words[3:5] == ["cache", f"{WORKDIR}/logs"]  # tmux session xar-cache
    expected = (
        "--source=imagenet --data_dir=gs://my-bkt/tfds --split=train --image_size=256"
        " --out_dir=gs://my-bkt/lat256"
        " --encoder=xar_jax.data.latent_cache:converted_vae_encoder --encoder_arg=/w/kl16"
        " --batch_size=256 --shard_size=1000 --num_workers=16 --multihost"
    )
    assert words[5:] == expected.split()  # --multihost: each worker encodes its own shards
    assert (
        "CACHE_SPLIT='test'"
        in launch("prepare_data.sh", "cache", VAE_DIR="/w", CACHE_SPLIT="test").stderr
    )
    assert "absolute path" in launch("prepare_data.sh", "cache", VAE_DIR="w/kl16").stderr


def test_stop_and_logs_know_the_cache_job(launch):
    stop = launch("stop.sh", MODE="cache").one("ssh")
    assert remote(stop)[2:4] == ["stop", "cache"]
    assert remote(launch("logs.sh", MODE="cache").one("ssh"))[2:4] == ["log", "cache"]
    assert "use one of: train sample eval cache" in launch("stop.sh", MODE="cache_latents").stderr


def test_convert_weights_runs_on_worker_0_for_each_given_file(launch):
    sources = {"VAE_CKPT": "gs://my-bkt/src/kl16.ckpt", "INCEPTION_PTH": "gs://my-bkt/src/i.pth"}
    result = launch("convert_weights.sh", **sources)
    ssh = result.find("ssh")
    assert [flag(c, "worker") for c in ssh] == ["0", "0"]
    assert [remote(c)[2:] for c in ssh] == [
        ["convert", "vae", "gs://my-bkt/src/kl16.ckpt", "gs://my-bkt/weights"],
        ["convert", "inception", "gs://my-bkt/src/i.pth", "gs://my-bkt/weights"],
    ]
    assert "nothing to convert" in launch("convert_weights.sh").stderr


def test_eval_needs_reference_stats_and_runs_on_every_worker(launch):
    assert "REFERENCE_STATS is not set" in launch("eval.sh").stderr
    paths = dict(SAMPLES_DIR="gs://my-bkt/samples", VAE_DIR="/w/kl16", INCEPTION_DIR="/w/inception")
    assert "VAE_DIR is not set" in launch("eval.sh", REFERENCE_STATS="gs://r.npz").stderr
    words = _start_command(launch("eval.sh", REFERENCE_STATS="gs://my-bkt/fid/ref.npz", **paths))
    assert words[3] == "eval" and "--mode=eval" in words and f"--workdir={WORKDIR}" in words
    assert words[-4:] == [
        "--config.sample.out_dir=gs://my-bkt/samples",
        "--config.latent.vae_checkpoint=/w/kl16",
        "--config.eval.inception_checkpoint=/w/inception",
        "--config.eval.reference_stats=gs://my-bkt/fid/ref.npz",
    ]
    # Without SAMPLES_DIR the trainer's default holds them: WORKDIR/generated, on gs:// too.
    paths.pop("SAMPLES_DIR")
    words = _start_command(launch("eval.sh", REFERENCE_STATS="gs://my-bkt/fid/ref.npz", **paths))
    assert not [w for w in words if w.startswith("--config.sample.out_dir")]


@pytest.mark.parametrize(
    "env_file", sorted((LAUNCH / "examples").glob("*.env")), ids=lambda p: p.name
)
def test_example_env_files_drive_the_scripts(launch, env_file):
    values = dict(
        ln.split("#")[0].strip().split("=", 1)
        for ln in env_file.read_text().splitlines()
        if "=" in ln.split("#")[0]
    )
    result = launch("start.sh", "--env", str(env_file), PROJECT=None, BUCKET=None)
    assert result.returncode == 0, result.stderr
    ssh = result.find("ssh")[-1]
    assert f"--project={values['PROJECT']}" in ssh
    assert f"--config={values['CONFIG']}" in remote(ssh)
