"""Build hook: a regular wheel copies tasks/ into lm-eval's task folder; an editable install does not.

lm-eval 0.4.13 indexes only `lm_eval/tasks` (plus --include_path), so a regular install places our task
YAMLs there (pyproject's force-include). An editable install must see edits to tasks/ instead: it installs
only the `.pth` shim, which points lm-eval's TaskManager at the source folder (wrappers/README.md).
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SHIM = {
    "wrappers/kvcore_eval_lm_eval.pth": "kvcore_eval_lm_eval.pth",
    "wrappers/kvcore_eval_lm_eval.py": "kvcore_eval_lm_eval.py",
}


class EditableTasksHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if version == "editable":
            build_data["force_include_editable"] = dict(SHIM)
