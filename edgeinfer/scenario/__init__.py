"""XRBench-style multi-model scenarios: several models sharing one chip, scored on real time, energy
and quality (docs/SCENARIOS.md).

- ``spec``: the scenario file (TOML) and its validation;
- ``workload``: the ``Workload`` protocol each model kind implements, and the kind registry;
- ``scheduler``: arrivals, deadlines, drops and cascades, on a fake or the real clock;
- ``scoring``: XRBench's real-time, energy and QoE scores, and the streaming (LLM) score;
- ``runner``: loads the models within one memory plan, runs, meters and splits the energy;
- ``report``: job records, scores, the timeline PNG and the HTML report.
"""

from .spec import ModelSpec, Scenario, builtin_names, load_scenario
from .workload import WORKLOAD_KINDS, FrameResult, Workload, register_workload

__all__ = ["WORKLOAD_KINDS", "FrameResult", "ModelSpec", "Scenario", "Workload", "builtin_names", "load_scenario",
           "register_workload"]
