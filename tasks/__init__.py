"""Built-in task plug-ins. Importing this package registers semseg, parts, depth, normals, edge, sal."""

from tasks import depth, edge, normals, parts, sal, semseg

__all__ = ["depth", "edge", "normals", "parts", "sal", "semseg"]
