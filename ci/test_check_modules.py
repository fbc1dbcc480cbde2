"""Tests of ci/check_modules.py: it finds a circle, an oversize file and a
long function in a made-up crate, and passes a layered one."""

import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import check_modules  # noqa: E402


def crate(files: dict[str, str]) -> Path:
    root = Path(tempfile.mkdtemp(prefix="berth-check-modules-"))
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


class CheckModulesTest(unittest.TestCase):
    def test_a_circle_through_three_modules_is_found(self):
        src = crate(
            {
                "lib.rs": "pub mod a; pub mod b; pub mod c; pub mod d;\n",
                "a.rs": "use crate::b::X;\n",
                "b/mod.rs": "use crate::{c, d::Y};\n",
                "c.rs": "fn f() { crate::a::g() }\n",
                "d.rs": "#[cfg(test)]\nmod tests {\n    use crate::a;\n}\n",
            }
        )
        graph = check_modules.module_graph(src)
        self.assertEqual(graph["b"], {"c", "d"})
        self.assertEqual(graph["d"], set(), "uses in tests do not count")
        self.assertEqual(check_modules.circles(graph), [["a", "b", "c"]])

    def test_layered_modules_have_no_circle(self):
        src = crate({"a.rs": "use crate::b;\n", "b.rs": "use crate::c;\n", "c.rs": "\n"})
        self.assertEqual(check_modules.circles(check_modules.module_graph(src)), [])

    def test_a_use_of_a_higher_layer_and_an_unplaced_module_are_named(self):
        src = crate(
            {
                "low.rs": "use crate::high::X;\n",
                "high.rs": "use crate::low::Y;\nuse crate::mid::Z;\n",
                "mid.rs": "\n",
                "stray.rs": "\n",
            }
        )
        graph = check_modules.module_graph(src)
        layers = [["low"], ["mid"], ["high"]]
        self.assertEqual(
            check_modules.layer_violations(graph, layers),
            ["low uses high, a layer above it", "stray is in no layer"],
        )
        graph["low"] = set()
        graph.pop("stray")
        self.assertEqual(check_modules.layer_violations(graph, layers), [])

    def test_a_function_over_the_limit_is_named_with_its_length(self):
        body = "".join(f"    let x{i} = {i};\n" for i in range(100))
        src = crate(
            {
                "long.rs": f"pub fn long() {{\n{body}}}\n\nfn short() {{\n    1\n}}\n",
            }
        )
        found = check_modules.long_functions(src / "long.rs")
        self.assertEqual(found, [("long", 102)])


if __name__ == "__main__":
    unittest.main()
