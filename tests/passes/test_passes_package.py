"""passes/: what every pass declares."""


def test_every_pass_declares_the_graph_it_acts_on():
    import importlib
    import pkgutil

    import fxptqat.passes as passes

    names = [m.name for m in pkgutil.iter_modules(passes.__path__)]
    assert len(names) >= 12
    for name in names:
        module = importlib.import_module(f"fxptqat.passes.{name}")
        assert getattr(module, "REQUIRES", None) in passes.GRAPHS, name
        assert name in passes.__doc__, f"passes/__init__.py does not list {name}"
