"""The toy world lmod brings (nothing is downloaded): the world of coloured shapes, the tiny teacher
trained on it, and tiny stand-ins of real MLLM families. The demo, the tests, the benchmarks and
`lmod world make` / `teacher make-tiny` import it; the stages (shared, teacher_dump,
student_train) never do."""
