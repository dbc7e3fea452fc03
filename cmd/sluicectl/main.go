package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"
)

// exitCode passes a command's exit status through without printing an error.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func main() {
	klog.InitFlags(nil)
	root := &cobra.Command{
		Use:          "sluicectl",
		Short:        "Status, diagnostics and a local lab for Sluice",
		SilenceUsage: true,
	}
	root.PersistentFlags().AddGoFlagSet(flag.CommandLine)
	root.AddCommand(newLabCommand(), newStatusCommand(), newExplainCommand(), newDropsCommand(), newChangesCommand(), newPolicyCommand())
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	if err := root.ExecuteContext(ctx); err != nil {
		var code exitCode
		if errors.As(err, &code) {
			os.Exit(int(code))
		}
		os.Exit(1)
	}
}
