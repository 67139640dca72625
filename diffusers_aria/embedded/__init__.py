"""The embedded default that runs offline on a CPU: the tiny teacher and its helpers, the built-in prompt pool."""

#: Training steps of a tiny teacher by default (`tiny_teacher.make_tiny_teacher`; about 2-3 minutes on 2 CPU cores).
#: Here, not in `tiny_teacher` (which loads torch), so that the command line checks its arguments in a second.
TINY_TEACHER_TRAIN_STEPS = 600
#: The tiny teacher's recipe; a cached teacher of another recipe is rebuilt by `make_tiny_teacher`.
TINY_TEACHER_RECIPE = 3
