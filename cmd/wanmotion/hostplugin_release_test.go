package main

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
)

// A plugin controller that fails its task before the engine ran (no
// checkpoint) records the outcome, then destroys the task if it is the
// plugin's; status answers from the record once the task is gone. A task
// of a migration with a checkpoint is kept (a resume continues on it).
func TestPluginControllerReleasesTaskItFailed(t *testing.T) {
	e := newCLIEnv(t)
	ctx := context.Background()
	c, err := xapi.New(xapi.Config{URL: e.a, Username: "root", Password: "xenroot", Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	cause := errors.New("the destination refused the login")

	for _, tc := range []struct {
		name       string
		owner      string
		checkpoint bool
		gone       bool
	}{
		{name: "the plugin's task", owner: engine.TaskOwnerController, gone: true},
		{name: "a third party's task", owner: "", gone: false},
		{name: "a migration with a checkpoint", owner: engine.TaskOwnerController, checkpoint: true, gone: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := hostplugin.Config{StateDir: t.TempDir(), TaskLinger: 0}
			id := "wm-early"
			task, err := c.TaskCreate(ctx, engine.TaskLabel, "wanmotion WAN migration "+id)
			require.NoError(t, err)
			if tc.owner != "" {
				require.NoError(t, c.TaskAddToOtherConfig(ctx, task, engine.TaskOwnerKey, tc.owner))
			}
			require.NoError(t, saveRecord(cfg, migrationRecord{MigrationID: id, Task: string(task), VMUUID: "vm-uuid"}))
			if tc.checkpoint {
				st, err := engine.NewFileStore(checkpointDir(cfg))
				require.NoError(t, err)
				require.NoError(t, st.Save(ctx, &engine.Checkpoint{Version: engine.CheckpointVersion, MigrationID: id,
					Phase: engine.PhaseSeed, Task: string(task)}))
			}
			job := pluginJob{ID: id, Task: string(task), Config: cfg}

			st, info := failTask(ctx, c, string(task), cause)
			require.Equal(t, xapi.TaskStatusFailure, st)
			require.NotEmpty(t, info)
			releaseFailedTask(ctx, job, c, st, info, testutil.Logger(t))

			rec, err := loadRecord(cfg, id)
			require.NoError(t, err)
			_, terr := c.TaskGetRecord(ctx, task)
			if !tc.gone {
				require.NoError(t, terr, "the task is kept")
				if tc.checkpoint {
					assert.Empty(t, rec.FinalStatus, "a resumable migration's record is unchanged")
				}
				return
			}
			require.ErrorIs(t, terr, xapi.ErrHandleInvalid, "the task was destroyed")
			assert.Equal(t, "failure", rec.FinalStatus)
			assert.Equal(t, info, rec.FinalErrorInfo)
			p := &pluginCall{cfg: cfg, log: testutil.Logger(t)}
			s, err := p.taskStatus(ctx, c, string(task), rec, true)
			require.NoError(t, err)
			assert.True(t, s.TaskGone)
			assert.Equal(t, "failure", s.Status)
			assert.Equal(t, info, s.ErrorInfo)
			assert.Equal(t, id, s.MigrationID)
		})
	}
}
