package cni

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// reportTimeout bounds the report of a call's outcome. The agent answers a
// report at once; an agent that is absent refuses the connection at once;
// only a hung agent costs this much, and the report is then dropped.
const reportTimeout = 200 * time.Millisecond

// reported runs a verb and tells the local agent how it ended, for the
// agent's sluice_cni_* metrics. A successful ADD was already counted by its
// registration, so the common case costs no extra round trip. The report
// never changes the call's result.
func reported(verb string, fn func(*skel.CmdArgs) error) func(*skel.CmdArgs) error {
	return func(args *skel.CmdArgs) error {
		err := fn(args)
		if verb == endpointapi.VerbAdd && err == nil {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), reportTimeout)
		defer cancel()
		_ = endpointapi.NewClient(agentSocket(args.StdinData)).Report(ctx, endpointapi.Outcome{Verb: verb, Code: errorCode(err)})
		return err
	}
}

// agentSocket finds the agent's socket even in a configuration that
// ParseConf rejects, so rejected calls are counted too.
func agentSocket(stdin []byte) string {
	var c struct {
		AgentSocket string `json:"agentSocket"`
	}
	if json.Unmarshal(stdin, &c) != nil || c.AgentSocket == "" {
		return endpointapi.DefaultSocket
	}
	return c.AgentSocket
}

// errorCode is the CNI error code the runtime sees: skel turns an untyped
// error into ErrInternal.
func errorCode(err error) uint {
	if err == nil {
		return 0
	}
	var e *types.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return types.ErrInternal
}
