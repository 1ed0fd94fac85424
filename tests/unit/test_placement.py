"""Ingress placement: one per serving node at least, spread evenly, none on a node that left."""

from __future__ import annotations

from sentientedge.placement import IngressPlan, plan_ingresses


def test_a_node_that_joins_gets_an_ingress():
    plan = plan_ingresses(2, ["a", "b", "c"], {"ingress-0": "a", "ingress-1": "b"})
    assert plan == IngressPlan(create_on=["c"])


def test_nothing_to_do_when_every_node_serves():
    assert not plan_ingresses(2, ["a", "b"], {"ingress-0": "a", "ingress-1": "b"})


def test_a_node_that_leaves_takes_its_ingresses_and_the_others_make_up_the_count():
    placed = {"ingress-0": "a", "ingress-1": "b", "ingress-2": "b"}
    plan = plan_ingresses(3, ["a"], placed)
    assert plan.gone == ["ingress-1", "ingress-2"]
    assert plan.create_on == ["a", "a"]  # 3 wanted; a holds one


def test_more_wanted_than_nodes_spreads_them_evenly():
    plan = plan_ingresses(5, ["a", "b"], {"ingress-0": "a"})
    assert sorted(plan.create_on) == ["a", "a", "b", "b"]


def test_fewer_wanted_stops_the_newest_on_the_busiest_node_but_never_a_nodes_last():
    placed = {"ingress-0": "a", "ingress-1": "b", "ingress-2": "a", "ingress-3": "a"}
    plan = plan_ingresses(2, ["a", "b"], placed)
    assert plan.surplus == ["ingress-3", "ingress-2"]
    assert plan_ingresses(1, ["a", "b"], {"ingress-0": "a", "ingress-1": "b"}).surplus == []


def test_ingresses_not_placed_yet_count_and_no_nodes_means_no_change():
    assert not plan_ingresses(2, ["a"], {"ingress-0": "a", "ingress-1": None})
    assert not plan_ingresses(2, [], {"ingress-0": "a"})
