"""A second Ray machine (here: a second Ray process on this host): status shows it, new replicas land there, `drain` moves them off."""

from __future__ import annotations

import threading

import pytest

import treelm
from tests.cluster.ray.cluster_harness import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def test_a_joined_machine_takes_new_replicas_and_drain_moves_them_off_while_serving(ray_world, capsys):
    ray_world.start_worker_node(num_cpus=2)
    status = wait_until(
        lambda: (s := ray_world.status(capsys)) and sum(n["alive"] for n in s["machines"]) == 2 and s,
        what="the second node in `treelm cluster status`",
    )
    worker = next(n for n in status["machines"] if n["alive"] and not n["head"])
    assert worker["cpus"] == 2 and worker["replicas"] == 0

    assert ray_world.cli("scale", "rt", "--replicas", "4") == 0
    status = ray_world.status(capsys)
    rt = next(t for t in status["trunks"] if t["tree"] == "rt")
    on_worker = [r for r in rt["replicas"] if r["machine_id"] == worker["machine_id"]]
    assert rt["running"] == 4 and on_worker, "no new replica landed on the new node"
    assert next(n for n in status["machines"] if n["machine_id"] == worker["machine_id"])["replicas"] == len(on_worker)

    outcomes: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with treelm.Client(ray_world.target, token=ray_world.world.tokens["globex"], timeout=60) as client:
            k = 0
            while not stop.is_set():
                node = ("rt/en", "rt/fr", "rt/en/medical", "rt/fr/medical", "rt/en/legal")[k % 5]
                try:
                    outcomes.append(client.generate(node, f"during drain {k}", max_new_tokens=8).node)
                except treelm.TreeLMError as exc:
                    outcomes.append(f"error: {exc}")
                k += 1

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert ray_world.cli("drain", worker["address"]) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    after = ray_world.status(capsys)
    rt = next(t for t in after["trunks"] if t["tree"] == "rt")
    assert rt["running"] == 4 and all(
        r["machine_id"] != worker["machine_id"] for t in after["trunks"] for r in t["replicas"]
    )
    assert len(outcomes) > 10 and not [o for o in outcomes if o.startswith("error")]  # served throughout
    assert ray_world.cli("scale", "rt", "--replicas", "1") == 0
    ray_world.stop_extra_nodes()


def test_drain_refuses_the_head_and_unknown_machines(ray_world, capsys):
    head = next(n for n in ray_world.status(capsys)["machines"] if n["head"])
    assert ray_world.cli("drain", head["address"]) == 2
    assert "head machine" in capsys.readouterr().err
    assert ray_world.cli("drain", "10.255.255.1:1") == 2
    assert "no live machine" in " ".join(capsys.readouterr().err.split())
