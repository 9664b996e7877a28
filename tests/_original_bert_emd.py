"""A plain transcription of the original BERT-EMD objective (lxk00/BERT-EMD,
``emd_task_distill.py``) used as the fidelity oracle of ``BertEMDLoss``.

Kept deliberately close to the original: per-pair ``nn.MSELoss`` loops into an (M+N) x (M+N)
symmetric distance matrix, ``pyemd.emd_with_flow`` on the zero-padded square problem (or POT's
``ot.emd`` on the same padded problem), numpy float64 layer weights and the three weight rules:

- ``"sum"``: the current repository version (``bert_emd/``): w_hat / sum(w_hat);
- ``"softmax"``: the earlier version (``bert-emd/``) with ``--add_softmax False``;
- ``"double_softmax"``: the earlier version with its default ``--add_softmax True``.

Only what the fidelity tests need is transcribed (no ``.cuda()``, no globals, no logging). The
original's quirks that do not matter for a numerical comparison are noted inline.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import MSELoss


def softmax(x):
    """Compute softmax values for each sets of scores in x (original helper)."""
    e_x = np.exp(x - np.max(x))
    return e_x / e_x.sum(axis=0)


def _emd_with_flow(a, b, dist, solver):
    if solver == "pyemd":
        from pyemd import emd_with_flow

        _, flow = emd_with_flow(a, b, dist)
        return np.asarray(flow, dtype=np.float64)
    import ot

    return ot.emd(a, b, dist)


class OriginalBertEMD:
    """State (the four weight vectors) and loss functions of the original ``transformer_loss``."""

    def __init__(
        self,
        stu_layer_num,
        tea_layer_num,
        *,
        T_emd=1.0,
        normalize="double_softmax",
        seperate=False,
        update_weight=True,
        solver="pyemd",
    ):
        self.att_student_weight = np.ones(stu_layer_num) / stu_layer_num
        self.rep_student_weight = np.ones(stu_layer_num) / stu_layer_num
        self.att_teacher_weight = np.ones(tea_layer_num) / tea_layer_num
        self.rep_teacher_weight = np.ones(tea_layer_num) / tea_layer_num
        self.T = T_emd
        self.normalize = normalize
        self.seperate = seperate
        self.update_weight = update_weight
        self.add_softmax = normalize == "double_softmax"
        self.solver = solver
        self.loss_mse = MSELoss()

    def get_new_layer_weight(self, trans_matrix, distance_matrix, stu_layer_num, tea_layer_num, T, type_update="att"):
        if type_update == "att":
            student_layer_weight = np.copy(self.att_student_weight)
            teacher_layer_weight = np.copy(self.att_teacher_weight)
        else:
            student_layer_weight = np.copy(self.rep_student_weight)
            teacher_layer_weight = np.copy(self.rep_teacher_weight)

        distance_matrix = distance_matrix.detach().cpu().numpy().astype("float64")
        trans_weight = np.sum(trans_matrix * distance_matrix, -1)
        for i in range(stu_layer_num):
            student_layer_weight[i] = trans_weight[i] / student_layer_weight[i]
        weight_sum = np.sum(student_layer_weight)
        for i in range(stu_layer_num):
            if student_layer_weight[i] != 0:
                student_layer_weight[i] = weight_sum / student_layer_weight[i]

        trans_weight = np.sum(np.transpose(trans_matrix) * distance_matrix, -1)
        for j in range(tea_layer_num):
            teacher_layer_weight[j] = trans_weight[j + stu_layer_num] / teacher_layer_weight[j]
        weight_sum = np.sum(teacher_layer_weight)
        for i in range(tea_layer_num):
            if teacher_layer_weight[i] != 0:
                teacher_layer_weight[i] = weight_sum / teacher_layer_weight[i]

        if self.normalize == "sum":
            student_layer_weight = student_layer_weight / np.sum(student_layer_weight)
            teacher_layer_weight = teacher_layer_weight / np.sum(teacher_layer_weight)
        else:
            student_layer_weight = softmax(student_layer_weight / T)
            teacher_layer_weight = softmax(teacher_layer_weight / T)

        if type_update == "att":
            self.att_student_weight = student_layer_weight
            self.att_teacher_weight = teacher_layer_weight
        else:
            self.rep_student_weight = student_layer_weight
            self.rep_teacher_weight = teacher_layer_weight

    def _padded_emd_loss(self, student_layer_weight, teacher_layer_weight, stu_layer_num, tea_layer_num, pair_loss):
        student_layer_weight = np.concatenate((student_layer_weight, np.zeros(tea_layer_num)))
        teacher_layer_weight = np.concatenate((np.zeros(stu_layer_num), teacher_layer_weight))
        totol_num = stu_layer_num + tea_layer_num
        distance_matrix = None
        for i in range(stu_layer_num):
            for j in range(tea_layer_num):
                tmp_loss = pair_loss(i, j)
                if distance_matrix is None:  # original: torch.zeros(...).cuda()
                    distance_matrix = torch.zeros([totol_num, totol_num], device=tmp_loss.device)
                distance_matrix[i][j + stu_layer_num] = distance_matrix[j + stu_layer_num][i] = tmp_loss
        trans_matrix = _emd_with_flow(
            student_layer_weight,
            teacher_layer_weight,
            distance_matrix.detach().cpu().numpy().astype("float64"),
            self.solver,
        )
        # float64 plan times float32 distances: the original's loss is float64.
        loss = torch.sum(torch.tensor(trans_matrix, device=distance_matrix.device) * distance_matrix)
        return loss, trans_matrix, distance_matrix

    def emd_rep_loss(
        self,
        student_reps,
        teacher_reps,
        student_layer_weight,
        teacher_layer_weight,
        stu_layer_num,
        tea_layer_num,
    ):
        def pair(i, j):
            return self.loss_mse(student_reps[i + 1], teacher_reps[j + 1])

        return self._padded_emd_loss(student_layer_weight, teacher_layer_weight, stu_layer_num, tea_layer_num, pair)

    def emd_att_loss(
        self,
        student_atts,
        teacher_atts,
        student_layer_weight,
        teacher_layer_weight,
        stu_layer_num,
        tea_layer_num,
    ):
        def pair(i, j):
            student_att = student_atts[i]
            teacher_att = teacher_atts[j]
            student_att = torch.where(student_att <= -1e2, torch.zeros_like(student_att), student_att)
            teacher_att = torch.where(teacher_att <= -1e2, torch.zeros_like(teacher_att), teacher_att)
            return self.loss_mse(student_att, teacher_att)

        return self._padded_emd_loss(student_layer_weight, teacher_layer_weight, stu_layer_num, tea_layer_num, pair)

    def transformer_loss(self, student_atts, teacher_atts, student_reps, teacher_reps, use_att=True, use_rep=True):
        """student_reps: projected hidden states (embeddings first), as TinyBERT's fit_dense gives."""
        stu_layer_num = len(student_atts)
        tea_layer_num = len(teacher_atts)
        T = self.T
        att_loss = rep_loss = torch.tensor(0.0)
        self.last = {}
        if use_att:
            att_loss, att_trans_matrix, att_distance_matrix = self.emd_att_loss(
                student_atts,
                teacher_atts,
                self.att_student_weight,
                self.att_teacher_weight,
                stu_layer_num,
                tea_layer_num,
            )
            self.last["att"] = (att_trans_matrix, att_distance_matrix.detach())
            if self.update_weight:
                self.get_new_layer_weight(att_trans_matrix, att_distance_matrix, stu_layer_num, tea_layer_num, T=T)
        if use_rep:
            rep_loss, rep_trans_matrix, rep_distance_matrix = self.emd_rep_loss(
                student_reps,
                teacher_reps,
                self.rep_student_weight,
                self.rep_teacher_weight,
                stu_layer_num,
                tea_layer_num,
            )
            self.last["rep"] = (rep_trans_matrix, rep_distance_matrix.detach())
            if self.update_weight:
                self.get_new_layer_weight(
                    rep_trans_matrix, rep_distance_matrix, stu_layer_num, tea_layer_num, T=T, type_update="xx"
                )

        if not self.seperate:
            student_weight = np.mean(np.stack([self.att_student_weight, self.rep_student_weight]), 0)
            teacher_weight = np.mean(np.stack([self.att_teacher_weight, self.rep_teacher_weight]), 0)
            self.att_student_weight = student_weight
            self.att_teacher_weight = teacher_weight
            self.rep_student_weight = student_weight
            self.rep_teacher_weight = teacher_weight
        if self.add_softmax:
            self.att_student_weight = softmax(self.att_student_weight)
            self.att_teacher_weight = softmax(self.att_teacher_weight)
            self.rep_student_weight = softmax(self.rep_student_weight)
            self.rep_teacher_weight = softmax(self.rep_teacher_weight)
        return att_loss, rep_loss


def distillation_loss(y, labels, teacher_scores, output_mode, T, alpha, reduce_T=1):
    """The original's prediction loss (``--new_pred_loss True``, ``is_teacher=True``)."""
    if output_mode == "classification":
        student_likelihood = torch.nn.functional.log_softmax(y / T, dim=-1)
        targets_prob = torch.nn.functional.softmax(teacher_scores / T, dim=-1)
        d_loss = (-targets_prob * student_likelihood).mean() * T * T / reduce_T
        nll_loss = torch.nn.functional.cross_entropy(y, labels, reduction="mean")
    else:
        loss_mse = MSELoss()
        d_loss = loss_mse(y.view(-1), teacher_scores.view(-1))
        nll_loss = loss_mse(y.view(-1), labels.view(-1))
    tol_loss = alpha * d_loss + (1.0 - alpha) * nll_loss
    return tol_loss, d_loss, nll_loss


def original_total_loss(
    state,
    student_atts,
    teacher_atts,
    student_reps,
    teacher_reps,
    student_logits,
    teacher_logits,
    labels,
    *,
    beta,
    T,
    alpha,
    output_mode="classification",
):
    """``args.one_step`` with ``use_emd``: beta * (rep + att + emb) + cls (use_embedding/att/rep on)."""
    loss_mse = MSELoss()
    att_loss, rep_loss = state.transformer_loss(student_atts, teacher_atts, student_reps, teacher_reps)
    embedding_loss = loss_mse(student_reps[0], teacher_reps[0])
    cls_loss, _, _ = distillation_loss(student_logits, labels, teacher_logits, output_mode, T=T, alpha=alpha)
    loss = beta * (rep_loss + att_loss + embedding_loss) + cls_loss
    return loss, {
        "attention": att_loss,
        "hidden": rep_loss,
        "embedding": embedding_loss,
        "prediction": cls_loss,
    }


def tinybert_skip_loss(student_atts, teacher_atts, student_reps, teacher_reps):
    """The original's TinyBERT branch (``tb_onestep``): skip mapping, sum of paired MSEs.

    Attention: student i <- teacher i*k + k - 1; hidden (embeddings included): student i <- teacher i*k.
    """
    loss_mse = MSELoss()
    att_loss = 0.0
    rep_loss = 0.0
    teacher_layer_num = len(teacher_atts)
    student_layer_num = len(student_atts)
    assert teacher_layer_num % student_layer_num == 0
    layers_per_block = int(teacher_layer_num / student_layer_num)
    new_teacher_atts = [teacher_atts[i * layers_per_block + layers_per_block - 1] for i in range(student_layer_num)]
    for student_att, teacher_att in zip(student_atts, new_teacher_atts):
        student_att = torch.where(student_att <= -1e2, torch.zeros_like(student_att), student_att)
        teacher_att = torch.where(teacher_att <= -1e2, torch.zeros_like(teacher_att), teacher_att)
        att_loss += loss_mse(student_att, teacher_att)
    new_teacher_reps = [teacher_reps[i * layers_per_block] for i in range(student_layer_num + 1)]
    for student_rep, teacher_rep in zip(student_reps, new_teacher_reps):
        rep_loss += loss_mse(student_rep, teacher_rep)
    return att_loss, rep_loss
