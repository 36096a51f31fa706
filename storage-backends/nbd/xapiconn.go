package nbdstore

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
)

// openXAPI returns a client using the session the request carries (never
// logged in or out by us). TLSPin (PEM) pins the pool master's certificate.
// url is an http(s) URL or a local socket ("unix:///var/lib/xcp/xapi", or
// XenAPI.py's "http://_var_lib_xcp_xapi/"), see xapi.NewFromURL.
func openXAPI(url, session, pin string, log hclog.Logger) (*xapi.Client, error) {
	if url == "" || session == "" {
		return nil, fmt.Errorf("no xapi access (URL and session needed): %w", contract.ErrInvalidArgument)
	}
	var opts xapi.TLSOptions
	if pin != "" {
		rest := []byte(pin)
		for {
			var blk *pem.Block
			blk, rest = pem.Decode(rest)
			if blk == nil {
				break
			}
			if blk.Type == "CERTIFICATE" {
				opts.Thumbprints = append(opts.Thumbprints, xapi.Thumbprint(blk.Bytes))
			}
		}
		if len(opts.Thumbprints) == 0 {
			return nil, fmt.Errorf("xapi TLS pin holds no PEM certificate: %w", contract.ErrInvalidArgument)
		}
	}
	c, err := xapi.NewFromURL(xapi.Config{URL: url, TLS: opts, Logger: log, DisableMemberDiscovery: true})
	if err != nil {
		return nil, fmt.Errorf("xapi client: %v: %w", err, contract.ErrInvalidArgument)
	}
	c.UseSession(xapi.SessionRef(session))
	return c, nil
}

// closeXAPI releases a client without logging the borrowed session out.
func closeXAPI(c *xapi.Client) {
	if c == nil {
		return
	}
	c.Forget()
	_ = c.Close(context.Background())
}

// xapiErr classifies an xapi error for the contract.
func xapiErr(what string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w: %v", what, contract.ErrCancelled, err)
	}
	if ae, ok := xapi.AsAPIError(err); ok {
		switch ae.Code {
		case "HANDLE_INVALID", "UUID_INVALID":
			return fmt.Errorf("%s: %v: %w", what, err, contract.ErrNotFound)
		case xapi.CodeSessionInvalid, xapi.CodeSessionAuthenticationFailed, "PERMISSION_DENIED", "RBAC_PERMISSION_DENIED":
			return fmt.Errorf("%s: %v: %w", what, err, contract.ErrPermissionDenied)
		case "SR_FULL", "SR_BACKEND_FAILURE_44", "VDI_TOO_LARGE", "VDI_IN_USE", "VDI_INCOMPATIBLE_TYPE",
			"VM_BAD_POWER_STATE", "OPERATION_NOT_ALLOWED", "SR_HAS_NO_PBDS":
			return fmt.Errorf("%s: %v: %w", what, err, contract.ErrFailedPrecondition)
		}
		return fmt.Errorf("%s: %v: %w", what, err, contract.ErrInternal)
	}
	return fmt.Errorf("%s: %v: %w", what, err, contract.ErrUnavailable)
}

// controlDomain returns the dom0 VM of the host with hostUUID, or of the
// pool coordinator when hostUUID is empty.
func controlDomain(ctx context.Context, c *xapi.Client, hostUUID string) (xapi.VMRef, error) {
	var host xapi.HostRef
	var err error
	if hostUUID != "" {
		host, err = c.HostGetByUUID(ctx, hostUUID)
	} else {
		var pool xapi.PoolRef
		if pool, err = c.ThePool(ctx); err == nil {
			host, err = c.PoolGetMaster(ctx, pool)
		}
	}
	if err != nil {
		return "", xapiErr("find host", err)
	}
	rec, err := c.HostGetRecord(ctx, host)
	if err != nil {
		return "", xapiErr("host record", err)
	}
	if rec.ControlDomain.IsNull() || rec.ControlDomain == "" {
		return "", fmt.Errorf("host %s has no control domain: %w", rec.NameLabel, contract.ErrFailedPrecondition)
	}
	return rec.ControlDomain, nil
}

// simDeviceKey is the VBD other_config key the simulator sets to the
// backing file of a dom0-attached VDI.
const simDeviceKey = "sim-device-path"

// attachToDom0 plugs vdi into the control domain of hostUUID and returns
// the VBD and the device path to open.
func attachToDom0(ctx context.Context, c *xapi.Client, hostUUID string, vdi xapi.VDIRef, mode xapi.VBDMode, tag string) (xapi.VBDRef, string, error) {
	dom0, err := controlDomain(ctx, c, hostUUID)
	if err != nil {
		return "", "", err
	}
	vbd, err := c.VBDCreate(ctx, xapi.VBDCreateSpec{VM: dom0, VDI: vdi, Mode: mode, Type: xapi.VBDTypeDisk,
		Unpluggable: true, OtherConfig: map[string]string{"wanmotion:attach": tag}})
	if err != nil {
		return "", "", xapiErr("create dom0 VBD", err)
	}
	if err := c.VBDPlug(ctx, vbd); err != nil {
		_ = c.VBDDestroy(context.WithoutCancel(ctx), vbd)
		return "", "", xapiErr("plug dom0 VBD", err)
	}
	path, err := vbdDevicePath(ctx, c, vbd)
	if err != nil {
		detachFromDom0(context.WithoutCancel(ctx), c, vbd)
		return "", "", err
	}
	return vbd, path, nil
}

// vbdDevicePath returns the dom0 device of a plugged VBD.
func vbdDevicePath(ctx context.Context, c *xapi.Client, vbd xapi.VBDRef) (string, error) {
	rec, err := c.VBDGetRecord(ctx, vbd)
	if err != nil {
		return "", xapiErr("VBD record", err)
	}
	if !rec.CurrentlyAttached {
		return "", fmt.Errorf("dom0 VBD is not attached: %w", contract.ErrFailedPrecondition)
	}
	path := rec.OtherConfig[simDeviceKey]
	if path == "" {
		path = rec.Device
		if path != "" && !strings.HasPrefix(path, "/") {
			path = "/dev/" + path
		}
	}
	if path == "" {
		return "", fmt.Errorf("dom0 VBD has no device: %w", contract.ErrFailedPrecondition)
	}
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("dom0 device %s: %v: %w", path, err, contract.ErrFailedPrecondition)
	}
	return path, nil
}

// detachFromDom0 unplugs and destroys a VBD, best effort (idempotent).
func detachFromDom0(ctx context.Context, c *xapi.Client, vbd xapi.VBDRef) {
	if c == nil || vbd == "" {
		return
	}
	_ = c.VBDUnplug(ctx, vbd)
	_ = c.VBDDestroy(ctx, vbd)
}
