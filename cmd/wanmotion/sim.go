package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// runSim runs the xapi simulator: it prints one JSON line describing the
// pools (URLs and credentials) and serves until ctx is done.
func runSim(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:0", "address of the first host; with a loopback IP each host gets the next loopback IP and the hosts of pool i share port N+i (0: a free port per pool)")
	pools := fs.Int("pools", 2, "number of pools (site-a, site-b, ...)")
	hosts := fs.Int("hosts", 2, "hosts per pool, coordinator included")
	stateDir := fs.String("state-dir", "", "directory for the object database and VDI files (required; reused across restarts)")
	diskSize := fs.String("disk-size", "1GiB", "virtual size of demo-vm's disk")
	fillSize := fs.String("fill-size", "", "bytes of data written into demo-vm's disk (default: a quarter of the disk, at most 256MiB)")
	memSize := fs.String("memory-size", "512MiB", "demo-vm's memory size")
	logLevel := fs.String("log-level", "info", "log level (trace, debug, info, warn, error)")
	guestRate := fs.String("guest-rate", "0", "demo-vm's guest disk write rate, e.g. 2MiB/s (0: no disk writes)")
	guestPattern := fs.String("guest-pattern", "random", "demo-vm's guest write pattern: sequential, random or hot-set")
	guestBlock := fs.String("guest-block-size", "64KiB", "size of each guest write")
	guestDirty := fs.String("guest-dirty-rate", "0", "demo-vm's guest memory page-dirty rate, e.g. 8MiB/s")
	installPlugin := fs.Bool("install-plugin", false, "install this binary as the wanmotion host plugin on every simulated host (host.call_plugin(..., \"wanmotion\", ...); needed by convergence_policy throttle)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: wanmotion sim --state-dir DIR [flags]\n\nRuns the xapi simulator. The first stdout line is a JSON object with the pools' URLs and credentials.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if *stateDir == "" {
		return fmt.Errorf("%w: --state-dir is required", errUsage)
	}
	cfg := xapisim.Config{StateDir: *stateDir, Pools: *pools, HostsPerPool: *hosts}
	var err error
	if cfg.DiskSize, err = parseByteSize(*diskSize); err != nil {
		return fmt.Errorf("%w: --disk-size: %v", errUsage, err)
	}
	if *fillSize != "" {
		if cfg.FillSize, err = parseByteSize(*fillSize); err != nil {
			return fmt.Errorf("%w: --fill-size: %v", errUsage, err)
		}
	}
	if cfg.MemorySize, err = parseByteSize(*memSize); err != nil {
		return fmt.Errorf("%w: --memory-size: %v", errUsage, err)
	}
	var guest xapisim.GuestConfig
	if guest, err = xapisim.GuestConfigFromMap(map[string]string{"rate": *guestRate, "pattern": *guestPattern,
		"block_size": *guestBlock, "dirty_rate": *guestDirty}); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	cfg.Logger = hclog.New(&hclog.LoggerOptions{Name: "sim", Level: hclog.LevelFromString(*logLevel), Output: stderr})
	sim, err := xapisim.New(cfg)
	if err != nil {
		return err
	}
	if err := sim.Start(ctx, *listen); err != nil {
		_ = sim.Close()
		return err
	}
	if *installPlugin {
		exe, err := os.Executable()
		if err == nil {
			err = sim.InstallPlugin(hostplugin.PluginName, exe)
		}
		if err != nil {
			_ = sim.Close()
			return fmt.Errorf("install the host plugin: %w", err)
		}
	}
	if guest.Rate > 0 || guest.DirtyRate > 0 {
		uuid, err := sim.VMUUIDByName(xapisim.DemoVMName)
		if err == nil {
			err = sim.StartGuest(uuid, guest)
		}
		if err != nil {
			_ = sim.Close()
			return fmt.Errorf("start demo-vm's guest: %w", err)
		}
	}
	b, err := json.Marshal(sim.Info())
	if err != nil {
		_ = sim.Close()
		return fmt.Errorf("encode info: %w", err)
	}
	if _, err := fmt.Fprintln(stdout, string(b)); err != nil {
		_ = sim.Close()
		return fmt.Errorf("write info: %w", err)
	}
	if f, ok := stdout.(*os.File); ok {
		_ = f.Sync()
	}
	select {
	case <-ctx.Done():
	case <-sim.Done():
	}
	return sim.Close()
}

// parseByteSize parses sizes like 1GiB, 512MiB, 64KiB, 1G, 1048576.
func parseByteSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suf string
		m   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
		{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}} {
		if strings.HasSuffix(t, u.suf) {
			t, mult = strings.TrimSuffix(t, u.suf), u.m
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(t), 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}
