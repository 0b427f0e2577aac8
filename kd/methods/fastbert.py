"""FastBERT (Liu et al., 2020): self-distillation of per-layer classifier branches from the model's own final one."""

from __future__ import annotations

from pydantic import Field
from transformers import PretrainedConfig, PreTrainedModel

from kd.models.fastbert import FastBertForSequenceClassification, fastbert_from
from kd.losses import kl_divergence
from kd.methods.base import METHODS, MODEL_INPUTS, Method, MethodParams, register_method
from kd.students import StudentShape


TEACHER = "teacher"


class FastBertParams(MethodParams):
    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature T of both distributions.")
    branch_hidden_size: int = Field(default=128, ge=1, description="Hidden width of each branch's MLP (paper: 128).")
    wrap: str = Field(default=TEACHER, min_length=1, description="The fine-tuned model that gets the branches: "
                      "'teacher', or the name of another student of the experiment whose BERT it wraps.")


def check_wrapped_shape(shape: StudentShape, depth: int, width: int | None, wrapped: str) -> None:
    """FastBERT keeps the shape of the model it wraps (``width`` None: that model's width is the teacher's)."""
    if shape.layers != depth or shape.hidden_size not in (None, width):
        raise ValueError(
            f"fastbert adds branches to a fine-tuned model and keeps its shape: ask for student.layers={depth} and "
            f"no other hidden_size, as {wrapped!r} has (got layers={shape.layers}, hidden_size={shape.hidden_size})"
        )


@register_method
class FastBert(Method):
    """L = Σ_{i=1}^{L−1} T² · KL(softmax(z_L/T) ‖ softmax(z_i/T)), z_i the logits of the branch after layer i and
    z_L the final classifier's.

    The teacher is the model's own final classifier, so no external teacher signal is read (cached and online
    signals are empty). The backbone and the final classifier are frozen: only the branches are trained, the
    model's full-depth predictions stay exactly those of the fine-tuned model it wraps, and the branches can learn
    from unlabelled text. ``build_student`` wraps the given fine-tuned model (the pipeline's ``teacher`` argument:
    the teacher itself or an already distilled student) at its own depth and width.
    """

    name = "fastbert"
    Params = FastBertParams
    bert_student = False  # branches on branches would mean nothing
    copies_layers = False
    classification_only = True  # a sample exits by the entropy of its class probabilities, which one score lacks
    exits_early = True

    def starts_from(self) -> str | None:
        return None if self.params.wrap == TEACHER else self.params.wrap

    def problems(self, where, spec, experiment):
        """The student it wraps exists, is a plain BERT classifier, and has this entry's shape."""
        wrapped = self.starts_from()
        if wrapped is None:
            return []
        names = {other.name: other for other in experiment.students}
        source = names.get(wrapped)
        if source is None or source is spec:
            return [f"{where}.params.wrap: {wrapped!r} is neither 'teacher' nor another student "
                    f"(students: {', '.join(n for n in names if n != spec.name) or 'none'})"]
        if not METHODS[source.method].bert_student:
            return [f"{where}.params.wrap: {wrapped!r} is a {source.method} student, not a fine-tuned BERT "
                    "classifier that branches can be added to"]
        try:
            check_wrapped_shape(spec.student, source.student.layers, source.student.hidden_size, wrapped)
        except ValueError as error:
            return [f"{where}: {error}"]
        return []

    def check_teacher(self, shape: StudentShape, teacher_config: PretrainedConfig) -> None:
        if self.starts_from() is None:
            check_wrapped_shape(shape, teacher_config.num_hidden_layers, teacher_config.hidden_size, TEACHER)

    def build_student(self, teacher: PreTrainedModel, shape: StudentShape) -> FastBertForSequenceClassification:
        check_wrapped_shape(shape, teacher.config.num_hidden_layers, teacher.config.hidden_size, self.params.wrap)
        student = fastbert_from(teacher, self.params.branch_hidden_size)
        student.freeze_backbone()
        return student

    def student_forward(self, student, batch, auxiliary, phase):
        return student(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, output_branch_logits=True)

    def loss(self, student_out, teacher_out, batch, auxiliary, phase):
        # The final classifier is frozen, so its logits carry no gradient either way; detach says they are a target.
        final = student_out.branch_logits[-1].detach()
        kl = final.new_zeros(())
        for branch in student_out.branch_logits[:-1]:
            kl = kl + kl_divergence(branch, final, self.params.temperature)
        return {"kl": kl, "total": kl}
