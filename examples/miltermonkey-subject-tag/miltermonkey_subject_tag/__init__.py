"""miltermonkey-subject-tag: mark mail from outside, the way many sites warn their users.

Installed as the ``subject_tag`` entry point of ``miltermonkey.brains``;
enable it with a ``[[brain]]`` table whose ``use = "subject_tag"``.
"""

from miltermonkey_subject_tag.brain import SubjectTagBrain, SubjectTagOptions

__version__ = "1.0.0"

__all__ = ["SubjectTagBrain", "SubjectTagOptions", "__version__"]
