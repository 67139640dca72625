"""Helpers that know nothing of ARIA: crash-safe writes (`atomic`), one-line user errors (`errors`), file names
shared by light and heavy modules (`file_names`), local path or Hub id (`paths`), the launched
process layout (`processes`)."""
