"""The evaluation protocols: whose conventions the metrics follow (config ``evaluation.protocol``, ``--protocol``).

- ``survey``: the evaluation code of the dense-prediction multi-task survey (Vandenhende et al., TPAMI 2021),
  the field's common baseline;
- ``astmt`` and ``rcm``: the evaluation code of the ASTMT (Maninis et al., CVPR 2019) and RCM (Kanakis et al.,
  ECCV 2020) papers (RCM's evaluators are ASTMT's, so the two presets agree);
- ``project``: this project's own conventions.

Each task type states what each protocol means for its metric (``rcm_nddr.task.Switch``)."""

PROTOCOLS = ("survey", "astmt", "rcm", "project")
