"""QuPath projects, one import for the three layers kept apart in their own modules.

* :mod:`qpcell.io.qupath_project`: the project's JSON files, read without QuPath or Java.
* :mod:`qpcell.io.paquo`: QuPath's own code (through paquo) reads points and writes cells.
* :mod:`qpcell.io.qupath_export`: the folder ``groovy/qpcell-train.groovy`` writes.

Code in qpcell imports from those modules; this one keeps older imports working.
"""

from qpcell.io.paquo import (
    PAQUO_MISSING,
    QUPATH_MISSING,
    PaquoWriter,
    QuPathInstall,
    add_paquo_classes,
    existing_detection_stubs,
    find_qupath_installation,
    hierarchy_features,
    import_paquo_project_class,
    open_paquo_project,
    paquo_classes,
    paquo_color_to_rgb,
    paquo_qupath_version,
    read_qupath_project,
    replace_in_hierarchy,
)
from qpcell.io.qupath_export import (
    EXPORT_FORMAT,
    EXPORT_INDEX,
    ExportedImage,
    is_qupath_export,
    read_export_index,
    read_qupath_export,
)
from qpcell.io.qupath_project import (
    PROJECT_FILE,
    ProjectImage,
    ProjectInfo,
    argb_to_rgb,
    image_stem,
    is_qupath_project,
    parse_image_root,
    pixel_size_um,
    project_file,
    read_path_classes,
    read_project_info,
    rgb_to_argb,
    select_images,
    uri_to_path,
)

__all__ = [
    "EXPORT_FORMAT", "EXPORT_INDEX", "PAQUO_MISSING", "PROJECT_FILE", "QUPATH_MISSING",
    "ExportedImage", "PaquoWriter", "ProjectImage", "ProjectInfo", "QuPathInstall",
    "add_paquo_classes", "argb_to_rgb", "existing_detection_stubs", "find_qupath_installation",
    "hierarchy_features", "image_stem", "import_paquo_project_class", "is_qupath_export",
    "is_qupath_project", "open_paquo_project", "paquo_classes", "paquo_color_to_rgb",
    "paquo_qupath_version", "parse_image_root", "pixel_size_um", "project_file",
    "read_export_index", "read_path_classes", "read_project_info", "read_qupath_export",
    "read_qupath_project", "replace_in_hierarchy", "rgb_to_argb", "select_images",
    "uri_to_path",
]
