"""The paper's W&B dashboard, built in code with wandb-workspaces: a Report (and a Workspace) with the panels of
Fig. 9-14 and the sample media, over the runs of one ``make paper`` (its W&B group).

``paper_report`` and ``paper_workspace`` are pure: they need no network and no login, and ``spec`` serializes them
for the tests. ``publish`` saves them to W&B, after ``require_login`` (one line when nobody is logged in).

Training runs (job_type train) log ``val/*`` against ``epoch``; evaluation runs (job_type eval) carry ``guidance_w``
and ``train_run`` in their config and ``fid``/``is_mean`` in their summary, so Fig. 11-12 plot summary against config.
Runs are grouped at the runset level (``groupby``): wandb-workspaces 0.4 serializes a panel-level groupby on the run
group wrongly.
"""

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from ddpm_lightning.errors import ConfigError

TRAIN_PANELS = [  # (title, y keys, x range): Fig. 9, 10, 13, 14 against the epoch
    ("FID over epochs (Fig. 9)", ["val/fid"], (None, None)),
    ("IS over epochs (Fig. 10)", ["val/is_mean"], (None, None)),
    ("Loss over training (Fig. 13)", ["train/loss_epoch"], (None, None)),
    ("Loss over training, epoch 5 onwards (Fig. 14)", ["train/loss_epoch"], (5, None)),
    (
        "Class agreement over epochs (linear probe; real test images)",
        ["val/class_acc", "val/class_acc_floor"],
        (None, None),
    ),
    ("Memorized fraction over epochs (d1/d2 < 1/3)", ["val/memorized", "val/memorized_floor"], (None, None)),
]
SWEEP_PANELS = [
    ("FID for different guidance levels (Fig. 11)", "fid"),
    ("IS for different guidance levels (Fig. 12)", "is_mean"),
    ("Class agreement for different guidance levels", "class_acc"),
    ("Precision for different guidance levels", "precision"),
    ("Recall for different guidance levels", "recall"),
]
MEDIA = ["samples", "val/fid_samples"]


def runsets(entity: str, project: str, group: str) -> tuple[wr.Runset, wr.Runset]:
    train = wr.Runset(
        entity=entity, project=project, name=f"{group}: trainings", filters=f"JobType = 'train' and Group = '{group}'"
    )
    sweeps = wr.Runset(
        entity=entity,
        project=project,
        name=f"{group}: guidance sweeps",
        filters=f"JobType = 'eval' and Group = '{group}'",
        groupby=["config.train_run"],
    )
    return train, sweeps


def train_panels() -> list:
    return [
        wr.LinePlot(title=title, x="epoch", y=y, range_x=range_x, title_x="epoch") for title, y, range_x in TRAIN_PANELS
    ]


def sweep_panels() -> list:
    return [
        wr.ScatterPlot(title=title, x=wr.Config("guidance_w"), y=wr.SummaryMetric(key)) for title, key in SWEEP_PANELS
    ]


def paper_report(entity: str, project: str, group: str) -> wr.Report:
    """The report: the four trainings (FID/IS/loss over epochs, samples), then FID/IS against w per improved model."""
    train, sweeps = runsets(entity, project, group)
    return wr.Report(
        entity=entity,
        project=project,
        title=f"DDPM and classifier-free guidance: the paper's experiment ({group})",
        description="Fig. 9-14 of the paper and the sample grids, from the runs of make paper",
        blocks=[
            wr.H1("Training: FID, IS and loss over epochs"),
            wr.PanelGrid(
                runsets=[train],
                panels=[*train_panels(), wr.MediaBrowser(title="Samples", media_keys=MEDIA, num_columns=2)],
            ),
            wr.H1("Guidance sweeps: one trained model, every w"),
            wr.PanelGrid(runsets=[sweeps], panels=sweep_panels()),
        ],
    )


def paper_workspace(entity: str, project: str, group: str) -> ws.Workspace:
    """The same panels as a workspace, its runs filtered to the experiment's group."""
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"paper: {group}",
        settings=ws.WorkspaceSettings(x_axis="epoch"),
        runset_settings=ws.RunsetSettings(filters=f"Group = '{group}'"),
        sections=[
            ws.Section(
                name="Training (Fig. 9, 10, 13, 14)",
                panels=[*train_panels(), wr.MediaBrowser(title="Samples", media_keys=MEDIA)],
                is_open=True,
            ),
            ws.Section(name="Guidance sweeps (Fig. 11, 12)", panels=sweep_panels(), is_open=True),
        ],
    )


def spec(view) -> dict:
    """The serialized form that is sent to W&B, built offline: the one server lookup on the way (each runset's
    project id, which ``save`` asks W&B for) answers "offline" here."""
    from wandb_workspaces.reports.v2 import interface

    lookup, api = interface.execute_graphql, interface._get_api
    interface.execute_graphql, interface._get_api = (
        (lambda *args, **kwargs: {"project": {"internalId": "offline"}}),
        (lambda: None),
    )
    try:
        return view._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")
    finally:
        interface.execute_graphql, interface._get_api = lookup, api


def require_login(entity: str | None) -> str:
    """The entity to publish to; one line (ConfigError) when nobody is logged in to W&B."""
    import wandb

    try:
        api = wandb.Api()
        entity = entity or api.default_entity
        if not api.api_key or not entity:
            raise ValueError("no API key")
    except Exception:
        raise ConfigError(
            "not logged in to W&B, so the dashboard cannot be published; run `wandb login` "
            "(or set WANDB_API_KEY) and rerun, or view the figures in the report dir offline"
        ) from None
    return entity


def publish(entity: str, project: str, group: str) -> list[str]:
    """Save the report and the workspace to W&B; their URLs."""
    report = paper_report(entity, project, group)
    report.save()
    workspace = paper_workspace(entity, project, group)
    workspace.save()
    return [report.url, workspace.url]
