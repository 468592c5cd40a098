"""Built-in task plug-ins. Importing this package registers semseg, parts, human_parts, depth, normals,
edge, sal."""

from rcm_nddr.tasks import depth, edge, human_parts, normals, parts, sal, semseg

__all__ = ["depth", "edge", "human_parts", "normals", "parts", "sal", "semseg"]
