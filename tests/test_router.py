"""Router (centroid, keywords, classifier-bound), its file and CLI; the adapter compatibility report."""

from __future__ import annotations

import json

import pytest
from adapters_util import make_adapter

from qlora_lite.cli.main import main as cli_main
from qlora_lite.errors import UserError
from qlora_lite.inference.portability import adapter_report, format_report
from qlora_lite.inference.router import Router

ORDERS = [
    f"Order: {n} apples and {n + 1} pears, deliver to {c}" for n, c in enumerate(["Berlin", "Paris", "Rome"])
]
ORDERS += ["Please ship 3 boxes of tea to Oslo", "I want to order 5 lamps, delivery to Madrid"]
SUPPORT = [
    "My parcel is late, what can I do?",
    "The app crashes when I log in",
    "How do I reset my password?",
]
SUPPORT += ["I was charged twice, please help", "The screen stays black after the update"]
HELD_OUT = [
    ("Order: 7 melons, deliver to Lisbon", "orders"),
    ("ship 2 chairs to Vienna please", "orders"),
    ("I cannot log in since the update", "support"),
    ("my password reset mail never came", "support"),
    ("Write a haiku about the moon", None),
]


def test_centroid_router_routes_falls_back_evaluates_and_round_trips(tmp_path):
    router = Router.from_samples({"orders": ORDERS, "support": SUPPORT}, threshold=0.08)
    route = router.route("Order: 4 apples, deliver to Berlin")
    assert route.adapter == "orders" and route.score > 0.08 and "orders" in route.reason
    assert router.route("I cannot log in, the app crashes").adapter == "support"
    adapter, score, reason = router.route("Write a haiku about the moon")
    assert adapter is None and "below the threshold" in reason
    report = router.evaluate(HELD_OUT)
    assert report["n"] == 5 and report["accuracy"] == 1.0 and report["fallbacks"] == 1
    assert report["confusion"]["orders"] == {"orders": 2} and report["confusion"]["base"] == {"base": 1}
    loaded = Router.load(router.save(tmp_path / "router.json"))
    assert [loaded.route(t) for t, _ in HELD_OUT] == [router.route(t) for t, _ in HELD_OUT]
    strict = Router.from_samples({"orders": ORDERS, "support": SUPPORT}, threshold=0.0, margin=0.99)
    assert "within the margin" in strict.route("Order: 4 apples").reason


def test_keyword_router_and_bad_inputs(tmp_path):
    router = Router.from_keywords({"orders": ["order", "deliver", "ship"], "support": ["password", "crash"]})
    assert router.route("please deliver my order").adapter == "orders"
    assert router.route("crash after password change").adapter == "support"
    assert router.route("deliver the password").adapter is None  # one match each: within the margin
    with pytest.raises(UserError, match="at least one word"):
        Router.from_keywords({"orders": []})
    with pytest.raises(UserError, match="no example texts for support"):
        Router.from_samples({"orders": ORDERS, "support": []})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a router file"):
        Router.load(tmp_path / "bad.json")


def test_classifier_router_bound_to_a_classify_function():
    def classify(text: str) -> dict:
        p = 0.9 if "order" in text else 0.2
        return {"label": "shop", "probabilities": {"shop": p, "other": 1 - p}}

    router = Router.from_classifier("unused-run", {"shop": "orders", "other": "base"}, threshold=0.6)
    router.bind_classifier(classify)
    assert router.route("an order of tea").adapter == "orders"
    assert router.route("a poem").adapter is None and "base" in router.route("a poem").reason
    assert router.adapters == ["orders"]


def test_route_cli_build_ask_evaluate(tmp_path, capsys):
    path = tmp_path / "r.json"
    args = [
        "route",
        "build",
        str(path),
        "--keywords",
        "orders=order,deliver",
        "--keywords",
        "support=password",
    ]
    assert cli_main(args) == 0
    capsys.readouterr()
    assert cli_main(["route", "ask", str(path), "--text", "deliver my order"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"] == "orders"
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"text": t, "adapter": a}) for t, a in HELD_OUT) + "\n")
    assert cli_main(["route", "evaluate", str(path), str(held)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 5
    assert cli_main(["route", "build", str(path)]) == 2
    assert "exactly one of" in capsys.readouterr().err
    held.write_text("not json\n")
    assert cli_main(["route", "evaluate", str(path), str(held)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_inspect_says_what_vllm_and_llama_cpp_accept(tiny_model, tmp_path, capsys):
    plain = make_adapter(tiny_model, tmp_path / "plain", seed=1, r=32)
    dora = make_adapter(tiny_model, tmp_path / "dora", seed=2, use_dora=True)
    rs = make_adapter(tiny_model, tmp_path / "rs", seed=3, use_rslora=True)
    report = adapter_report(plain)
    assert report["rank"] == 32 and report["targets"] == ["q_proj", "v_proj"] and report["size_bytes"] > 0
    assert report["vllm"]["ok"] and "--max-lora-rank 32" in report["vllm"]["notes"][0]
    assert report["llama_cpp"]["ok"]
    bad = adapter_report(dora)
    assert not bad["vllm"]["ok"] and "DoRA" in bad["vllm"]["reasons"][0]
    assert not bad["llama_cpp"]["ok"] and "magnitude" in bad["llama_cpp"]["reasons"][0]
    scaled = adapter_report(rs)
    assert (
        scaled["vllm"]["ok"]
        and not scaled["llama_cpp"]["ok"]
        and "rsLoRA" in scaled["llama_cpp"]["reasons"][0]
    )
    assert "refused: DoRA" in format_report(bad)
    assert cli_main(["adapters", "inspect", dora]) == 0
    assert "vLLM" in capsys.readouterr().out
    assert cli_main(["adapters", "inspect", plain, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vllm"]["ok"] is True
    assert cli_main(["adapters", "inspect", str(tmp_path / "nope")]) == 2
