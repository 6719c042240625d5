"""The inner loop, recorded step by step without a graph: one recorder for one task or a meta-batch.

:class:`InnerLoop` takes the steps of every entry point (a drop-in's ``adapt`` one at a time, the
engine's ``K`` at once), all ``B`` tasks together; its :meth:`InnerLoop.outputs` are outputs of the
node of :mod:`binom_opt.core.node`. Other tensors the support loss reaches that require grad are
found by walking its graph the first time a closure runs (docs/design.md, "Other meta-parameters").
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from .adaptation import Adaptation
from .batching import Tasks
from .closures import captured_shapes, closure_key, cut_captured
from .context import RandomState, StepContext, device_types, devices_of
from .estimators import Estimator, Exact, Implicit
from .implicit import proximal
from .memory import AUTO_KEEP_GRAPH_CAP, ActivationBytes, keeps_graphs, measured_once
from .node import Record, Status
from .norm_layers import needs_hooks
from .oracle import support_activations
from .setup import Setup
from .stepper import Stepper
from .trajectory import DROPPED, Graph, Stored, Trajectory
from .update_rules import Hyper, StepTranspose, UpdateRule, check_hyper, detached, learned

Tensors = Dict[str, torch.Tensor]
LossFn = Callable[[Tensors, object], torch.Tensor]

__all__ = ["Setup", "Stepper", "InnerLoop"]  # Setup re-exported: the shells build it with the loop


_NOT_REPLAYED = StepContext(())  # the context of a step outside every estimator's window (FirstOrder, Reptile)


def _tasks_of(t: torch.Tensor, B: int) -> torch.Tensor:
    """``t`` as the same point for each of ``B`` tasks, ``[B, ...]`` (a view)."""
    return t.unsqueeze(0) if B == 1 else t.unsqueeze(0).expand(B, *t.shape)


class InnerLoop:
    """One adaptation of ``B`` tasks (or one task), recorded so that its meta-gradient can be estimated later.

    Args:
        setup: the shared :class:`Setup`.
        initial: the initial point of the adapted parameters (the meta-parameters, by name).
        rules, hyper: the update rule of each adapted parameter and its hyperparameters (``{"lr": ...}``;
            tensors that require grad are meta-parameters).
        tasks: the task axis (:class:`~binom_opt.core.batching.Tasks`).
    """

    def __init__(self, setup: Setup, initial: Tensors, rules: Dict[str, UpdateRule], hyper: Dict[str, Hyper], tasks: Tasks):
        check_hyper(hyper, initial)
        self.setup, self.initial, self.rules, self.hyper, self.tasks = setup, dict(initial), rules, hyper, tasks
        options = setup.options
        self.stepper = Stepper(rules, tasks, options, setup.allow_unused)
        self._transpose = StepTranspose(rules, hyper)
        self._every = options.checkpoint_every or 1
        # points before the estimator's window are never read, unless the transposes read every step
        self._window = None if self._transpose.nonlinear or self._every > 1 else setup.estimator.window
        if tasks.batched or options.compile_hvps:
            phi = {n: _tasks_of(t.detach(), tasks.size) for n, t in self.initial.items()}
            # compiled: the strides of every later step, so that the compiled step is reused for the first
            self._at = Stored({n: t.contiguous() for n, t in phi.items()} if options.compile_hvps else phi)
        else:  # one task: its first step's leaves are the initial parameters detached, the point made only if read
            self._at = Stored(update=(list(self.initial), [t.detach() for t in self.initial.values()]))
        self._stateful = any(r.state_names for r in rules.values())
        self._state = {n: rules[n].init_state(self._phi[n]) for n in self._phi} if self._stateful else {}
        tensors = list(self.initial.values())  # every step's point lives where the initial point does
        self._devices = device_types(tensors), devices_of(tensors)
        # (hyper, whether its transposes read values, its one float SGD rate, detached)
        self._last_hyper: Optional[Tuple[Dict[str, Hyper], bool, Optional[float], Dict[str, Hyper]]] = None
        self._stored: List[Optional[Stored]] = []
        self._loss_fns: List[LossFn] = []
        self._keys: List[object] = []  # what identifies each step's support loss across adaptations (measurements)
        self._losses: List[torch.Tensor] = []
        # by closure_key: the closure, its loss, its measurement key, and whether its calls need the module hooks
        self._closures: Dict[tuple, Tuple[Callable, LossFn, Optional[tuple], bool]] = {}
        self._meta_inputs: Dict[int, torch.Tensor] = {}
        self._origins: Dict[int, torch.Tensor] = {}  # a closure's cut captured tensor, by the id of the leaf it reads
        self._versions = {n: t._version for n, t in self.initial.items()}
        self._hyper_steps: List[Dict[str, Hyper]] = []  # each step's hyperparameters (``override`` per step)
        self._values: List[bool] = []  # whether each step's transpose reads its recorded values
        self._first_order: List[int] = []  # steps whose Hessians are dropped (learn2learn's adapt(first_order=True))
        self._sealed: Optional[Tensors] = None
        self._status = Status()
        self._stream: Optional[RandomState] = None  # randomness="same": the one stream every step runs from
        # the reg of the proximal term every support loss gets (Implicit's inner loop), else None
        self._proximal = setup.estimator.reg if isinstance(setup.estimator, Implicit) else None
        # "auto", one task: each step keeps its gradient's graph, as unrolled autograd does, while the graphs of this
        # adaptation stay within AUTO_KEEP_GRAPH_CAP (a small model), so that the estimator's HVPs differentiate it
        # instead of replaying the step's forward and backward (Implicit's HVPs are at the final point: none kept)
        self._keep = keeps_graphs(options, tasks.batched) and self._window != 0 and self._proximal is None
        # Exact takes every adjoint in one backward through kept plain-SGD steps chained by their updates, as unrolled
        # autograd does (trajectory.chain_adjoints): no Python between two HVPs
        self._chains = self._keep and isinstance(setup.estimator, Exact)
        self._graphs: Dict[int, Graph] = {}
        self._sizes: Dict[Optional[tuple], Optional[ActivationBytes]] = {}  # measured activations, by support loss (this loop's)

    @property
    def _phi(self) -> Tensors:
        return self._at.phi

    @property
    def steps_taken(self) -> int:
        return len(self._loss_fns)

    @property
    def finished(self) -> bool:
        """Whether a meta-gradient already went through this loop."""
        return self._status.finished

    def step(self, closure: Callable, hyper: Optional[Dict[str, Hyper]] = None, first_order: bool = False,
             allow_unused: Optional[bool] = None, modes: Optional[tuple] = None, modules: Optional[list] = None) -> None:
        """One inner step on the support loss of ``closure``; records the point, keeps no graph.

        ``hyper`` replaces the hyperparameters from this step on (higher's ``override``); ``first_order`` drops this
        step's Hessian (its gradient is held constant, learn2learn's ``first_order``); ``allow_unused`` as in
        :class:`Setup`, for this step; ``modes``: the train/eval modes of the adapted model's modules that the
        closure runs in (``None``: the model's own now), of ``modules`` (by default the model's ``modules()``)."""
        if self.finished:
            raise RuntimeError(
                "This adaptation's meta-gradient was already computed (backward ran through it): adapting it further "
                "would count its steps twice. Start a new one for the next task (maml.clone(), a new innerloop_ctx, "
                "or engine.adapt)."
            )
        if isinstance(closure, torch.Tensor) or not callable(closure):
            raise TypeError(
                "Pass a closure learner -> support loss, e.g. lambda m: F.cross_entropy(m(x), y), not "
                f"{type(closure).__name__}: binom_opt replays the support loss at recorded points to take "
                "Hessian-vector products after the inner loop, so it needs the function, not one value."
            )
        if hyper is not None:
            check_hyper(hyper, self.initial)
            if set(hyper) != set(self.initial):
                raise ValueError(f"A step's hyperparameters need one entry per adapted parameter {list(self.initial)}.")
            self.hyper = hyper
        key = (*closure_key(closure), modes)
        known = self._closures.get(key)
        loss_fn = known[1] if known else self._support_loss(closure, modes, modules)
        # what identifies the support loss for a measurement of its HVPs' memory: none where no Hessian is kept
        measure_key = known[2] if known else (key[0], modes, self._proximal, captured_shapes(closure)) if self._window != 0 else None
        k = self.steps_taken
        # adapted without grad (evaluation), no meta-gradient follows: nothing to keep a graph for
        keep = self._keep and torch.is_grad_enabled()
        sizes = self._sizes.get(measure_key) if keep else None  # None: not measured yet
        if keep and sizes is None:  # one task's point has the initial parameters' shapes
            sizes = self._sizes[measure_key] = measured_once(measure_key, self.initial, None)
        measured = keep and sizes is None
        kept: Optional[list] = [] if keep and not first_order and sizes is not None and self._fits(sizes) else None
        if self._last_hyper is None or self._last_hyper[0] is not self.hyper:  # read once per hyperparameter setting
            self._last_hyper = (self.hyper, *self._transpose.reads(self.hyper), {n: detached(h) for n, h in self.hyper.items()})
        values = self._last_hyper[1]  # whether this step's transpose reads its values
        # a step outside the estimator's window whose values no transpose reads never runs again: no context to record
        replayed = self._window != 0 or values or self.setup.options.randomness == "same"
        live, before = self._context_before() if replayed else (None, None)
        # the previous step's update with its graph, as this step's point; not for a closure's first call, whose probe
        # walks the loss's graph for meta-parameters and would take the chain's first leaves for some
        before_k = self._graphs.get(k - 1) if kept is not None and known is not None else None
        chain = before_k.out if before_k is not None else None
        # one task on the plain path: its point without the task axis (the last update's own tensors: chained, the
        # previous update with its graph), and a plain-SGD update taken with the gradient; Exact links a kept one (the
        # next step chains to it; the chain's backward takes the mixed terms of other meta-parameters too)
        one = not self.tasks.batched and self.stepper.plain(probe=known is None)
        link = kept is not None and self._chains
        point = self._at.one() if one else self._phi
        grads, losses, found, update, special = self.stepper.gradient(
            loss_fn, point, k, probe=known is None, allow_unused=allow_unused, context=live, keep=kept, one=one,
            chain=chain is not None, rate=self._last_hyper[2] if one else None, link=link, hooks=known[3] if known else True)
        # a kept step whose transposes read no values is differentiated through its graph, replayed only by a second
        # backward or in a round whose other steps kept none: its start state is recorded as it is, without the check
        # of whether it drew (one state read less; a replay from it reproduces the step either way)
        recorded = live or (self._context_after(k, before, unchecked=kept is not None and not values) if replayed
                            else _NOT_REPLAYED)
        if measured:  # measured once the probe has vetted the closure, for the steps to come; a failure
            # (an operator without a second derivative) keeps no graph, and the replayed HVPs say so
            too_large = ActivationBytes(gradient=AUTO_KEEP_GRAPH_CAP + 1, hvp=AUTO_KEEP_GRAPH_CAP + 1)
            self._sizes[measure_key] = support_activations(loss_fn, {n: t[0] for n, t in self._phi.items()}, None,
                                                           self.setup.options, recorded, measure_key, fallback=too_large)
        # the probe ran the closure with the hooks: later calls of it take them only where they change something
        self._closures[key] = known or (closure, loss_fn, measure_key, needs_hooks(self.setup.options.bn, special))
        for t in found:
            self._meta_inputs.setdefault(id(t), t)
        if kept:
            self._graphs[k] = kept[0]
        keep_state = self._stateful and (values or self._every > 1)
        self._stored.append((Stored(self._phi, self._state) if keep_state else self._at) if k % self._every == 0 else None)
        self._values.append(values)
        if self._window is not None and k >= self._window and not self._values[k - self._window]:
            self._stored[k - self._window] = DROPPED
            self._graphs.pop(k - self._window, None)
        self._loss_fns.append(loss_fn)
        self._keys.append(measure_key)
        self._losses.append(losses)
        self._hyper_steps.append(self.hyper)
        self.stepper.hyper.append(self._last_hyper[3])
        self.stepper.rates.append(self._last_hyper[2])
        self.stepper.contexts.append(recorded)
        if first_order:
            self._first_order.append(k)
        if update is not None:  # the same update, taken with the gradient: the point is its value, read when needed
            self._at, self._state = Stored(update=(list(self.initial), update)), {}
        else:
            phi, self._state = self.stepper.update(k, self._phi, self._state, grads)
            self._at = Stored(phi)
        self._sealed = None

    def _context_before(self) -> Tuple[Optional[StepContext], Optional[RandomState]]:
        """Before a step: the context to run it in (``None``: the caller's) and, under ``randomness="replay"`` with one
        task at a time (a meta-batch refuses random ops there), the random state it starts from. Under ``"same"``
        every step runs from one stream, the caller's left untouched."""
        options, (types, devices) = self.setup.options, self._devices
        if options.randomness == "same":
            if self._stream is None:
                self._stream = RandomState.capture(devices)
            return StepContext.now(types, self._stream), None
        return None, RandomState.capture(devices) if options.randomness == "replay" and not self.tasks.batched else None

    def _context_after(self, k: int, before: Optional[RandomState], unchecked: bool = False) -> StepContext:
        """After step ``k`` ran in the caller's context: that context, recorded (its autocast state, and the random
        state ``before`` it if it drew random numbers; ``unchecked``: whether or not it drew, which a replay from it
        reproduces either way)."""
        options, (types, devices) = self.setup.options, self._devices
        if unchecked and before is not None:
            return StepContext.now(types, before)
        drew = before is not None and before.moved(devices)
        if before is not None and drew and options.compile_hvps:
            before.restore()  # the step is refused: the caller's generators as they were
            raise ValueError(
                f"Inner step {k} drew random numbers (dropout or another random op), which compile_hvps cannot replay: "
                "compiled random ops draw other numbers than eager ones. Leave compile_hvps=False, or make the support "
                "loss deterministic (dropout layers in eval mode)."
            )
        return StepContext.now(types, before if drew else None)

    def _fits(self, sizes: ActivationBytes) -> bool:
        """Whether one more step's graph keeps this adaptation's within :data:`AUTO_KEEP_GRAPH_CAP`, by the measured
        activations of an HVP of its support loss (what a step's graph holds, and a little more)."""
        return (len(self._graphs) + 1) * sizes.hvp <= AUTO_KEEP_GRAPH_CAP

    def _support_loss(self, closure: Callable, modes: Optional[tuple], modules: Optional[list] = None) -> LossFn:
        """The support loss of a closure (in ``modes``); with :class:`~binom_opt.Implicit`, plus its proximal term."""
        closure, origins = cut_captured(closure)  # captured tensors with a graph: leaves here, mapped back in outputs()
        self._origins.update(origins)
        loss_fn = self.setup.make_loss(closure) if modes is None else self.setup.make_loss(closure, modes, modules)
        return loss_fn if self._proximal is None else proximal(loss_fn, self.initial, self._proximal)

    def outputs(self, estimator: Optional[Estimator] = None) -> Tensors:
        """The adapted parameters after the steps so far, ``[B, ...]`` (one task without data: its own, without the
        task axis), differentiable with respect to the meta-parameters: their backward is ``estimator`` (the setup's by
        default; several estimators may read one recorded loop). ``initial_inputs`` is then the initial point they
        start from (``[B, ...]``, or the initial parameters themselves)."""
        if self._sealed is not None and estimator is None:
            return self._sealed
        one = not self.tasks.batched
        self.initial_inputs = dict(self.initial) if one else {n: _tasks_of(t, self.tasks.size) for n, t in self.initial.items()}
        if not self._loss_fns:
            return {n: t.view_as(t) for n, t in self.initial.items()} if one else self.initial_inputs
        trajectory = Trajectory(list(self._stored), list(self._loss_fns), torch.stack(self._losses), self._at, self.stepper,
                                self._every, keep_grads=any(self._values), keys=list(self._keys), graphs=dict(self._graphs),
                                final_task=self._at.one() if one else None)
        hyper = list(self._hyper_steps)
        settings = {id(h): h for h in hyper}.values()  # the steps share a few hyperparameter settings (usually one)
        record = Record(self.setup, estimator or self.setup.estimator, trajectory, self.tasks, self.rules, hyper,
                        list(self._meta_inputs.values()), learned(*settings), self._status, dict(self.initial),
                        dict(self._versions), frozenset(self._first_order), self._proximal, self._transpose.read_cache)
        hyper_inputs = (v for _, _, v in record.hyper_inputs)
        meta_inputs = (self._origins.get(id(t), t) for t in record.meta_inputs)  # a cut leaf's gradient is its tensor's
        outputs = dict(zip(self.initial, Adaptation.apply(record, *self.initial_inputs.values(), *meta_inputs, *hyper_inputs)))
        if estimator is None:
            self._sealed = outputs
        return outputs
